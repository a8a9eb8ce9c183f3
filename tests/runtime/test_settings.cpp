#include <gtest/gtest.h>

#include "runtime/error.hpp"
#include "runtime/log.hpp"
#include "runtime/settings.hpp"

namespace meshtrain {
namespace {

TEST(Settings, Defaults) {
  Settings s = Settings::parse({});
  EXPECT_EQ(s.threads, 0);
  EXPECT_EQ(s.log_level, "info");
  EXPECT_DOUBLE_EQ(s.comm_timeout_s, 600.0);
  EXPECT_FALSE(s.comm_debug);
  EXPECT_TRUE(s.allocator_cache);
  EXPECT_EQ(s.comm_poll_us, 0);
  EXPECT_EQ(Settings::parse({{"MESHTRAIN_COMM_POLL_US", "auto"}}).comm_poll_us, 0);
}

TEST(Settings, ParsesValues) {
  Settings s = Settings::parse({{"MESHTRAIN_THREADS", "3"},
                                {"MESHTRAIN_COMM_TIMEOUT", "2.5"},
                                {"MESHTRAIN_COMM_DEBUG", "1"},
                                {"MESHTRAIN_LOG_LEVEL", "debug"},
                                {"MESHTRAIN_COMM_POLL_US", "400"},
                                {"MESHTRAIN_THREDS", "2"}});
  EXPECT_EQ(s.comm_poll_us, 400);
  EXPECT_EQ(s.threads, 3);
  EXPECT_DOUBLE_EQ(s.comm_timeout_s, 2.5);
  EXPECT_TRUE(s.comm_debug);
  EXPECT_EQ(s.log_level, "debug");
  ASSERT_EQ(s.unknown.size(), 1u);
  EXPECT_EQ(s.unknown[0], "MESHTRAIN_THREDS");
}

TEST(Settings, BadValuesNameTheVariable) {
  for (auto [k, v] :
       std::vector<std::pair<std::string, std::string>>{{"MESHTRAIN_THREADS", "-1"},
                                                        {"MESHTRAIN_THREADS", "two"},
                                                        {"MESHTRAIN_COMM_TIMEOUT", "0"},
                                                        {"MESHTRAIN_COMM_TIMEOUT", "inf"},
                                                        {"MESHTRAIN_COMM_DEBUG", "maybe"},
                                                        {"MESHTRAIN_LOG_LEVEL", "loud"},
                                                        {"MESHTRAIN_COMM_POLL_US", "5"},
                                                        {"MESHTRAIN_COMM_POLL_US", "200000"},
                                                        {"MESHTRAIN_COMM_POLL_US", "1ms"}}) {
    try {
      Settings::parse({{k, v}});
      FAIL() << k << "=" << v << " was accepted";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(k), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(v), std::string::npos) << e.what();
    }
  }
}

TEST(Settings, TableListsEveryVariable) {
  std::map<std::string, std::string> env;
  for (const auto& s : setting_table()) env[s.name] = s.default_value;
  EXPECT_TRUE(Settings::parse(env).unknown.empty());
}

TEST(Log, RankLabel) {
  log::set_rank(2, 4);
  EXPECT_EQ(log::rank_label(), "rank 2/4");
  EXPECT_THROW(log::set_level("loud"), InvalidArgument);
}

}  // namespace
}  // namespace meshtrain
