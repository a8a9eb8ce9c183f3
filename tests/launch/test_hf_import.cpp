// import_hf against hostile config.json and model.safetensors files: every refusal is an
// InvalidArgument naming the file and the field, and nothing the size of the model that
// config.json describes is allocated before the file's tensors are checked against it. Cases
// that fuzzing (tests/fuzz, target hf_import) found are marked.
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "launch/hf.hpp"
#include "runtime/error.hpp"

namespace meshtrain::launch {
namespace {

namespace fs = std::filesystem;

class HfImportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("mt_hf_import_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    models::GPTConfig c;
    c.n_layer = 1;
    c.n_head = 2;
    c.n_embd = 8;
    c.block_size = 4;
    c.vocab_size = 256;
    c.padded_vocab = 256;
    const models::GPT m(c, PrecisionPolicy::parse("fp32"));
    export_hf(m, m.initial_weights(1), dir_.string());
    std::ifstream in(dir_ / "config.json");
    config_ = nlohmann::ordered_json::parse(in);
  }
  void TearDown() override { fs::remove_all(dir_); }

  void write_config(const std::string& text) const {
    std::ofstream(dir_ / "config.json", std::ios::binary | std::ios::trunc) << text;
  }
  // The error import_hf gives for config.json = text; fails the test when it gives none.
  std::string error_for(const std::string& text) const {
    write_config(text);
    try {
      import_hf(dir_.string());
    } catch (const InvalidArgument& e) {
      return e.what();
    }
    ADD_FAILURE() << "import_hf accepted " << text.substr(0, 200);
    return "";
  }
  std::string edited(const std::function<void(nlohmann::ordered_json&)>& edit) const {
    nlohmann::ordered_json j = config_;
    edit(j);
    return j.dump();
  }

  fs::path dir_;
  nlohmann::ordered_json config_;
};

TEST_F(HfImportTest, TheExportImports) {
  const ImportedModel m = import_hf(dir_.string());
  EXPECT_EQ(m.config.n_embd, 8);
}

// Found by fuzzing: optional fields of another JSON type escaped as nlohmann::type_error.
TEST_F(HfImportTest, OptionalFieldsOfTheWrongTypeAreNamed) {
  const std::string cfg = (dir_ / "config.json").string();
  for (const auto& [key, value] : std::vector<std::pair<std::string, nlohmann::ordered_json>>{
           {"activation_function", 5},
           {"layer_norm_epsilon", "1e-5"},
           {"scale_attn_weights", 1},
           {"tie_word_embeddings", nullptr},
           {"reorder_and_upcast_attn", "no"}}) {
    const std::string e = error_for(edited([&](auto& j) { j[key] = value; }));
    EXPECT_NE(e.find(cfg), std::string::npos) << e;
    EXPECT_NE(e.find("'" + key + "'"), std::string::npos) << e;
  }
}

TEST_F(HfImportTest, HugeNumbersAreOutOfRangeNotWrapped) {
  const std::string e = error_for(edited([](auto& j) { j["n_layer"] = 18446744073709551615ull; }));
  EXPECT_NE(e.find("'n_layer' = 18446744073709551615 is out of range"), std::string::npos) << e;
}

// A config.json that describes the largest model the fields allow, beside a small file: the
// tensors are checked against it before anything that size is allocated (the import used to
// build the whole model first: 5 x 10^13 parameters here).
TEST_F(HfImportTest, AHugeConfigIsCheckedAgainstTheFileBeforeAllocating) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::string e = error_for(edited([](auto& j) {
    j["n_layer"] = 1024;
    j["n_embd"] = 65536;
    j["n_head"] = 1024;
    j["n_inner"] = nullptr;
    j["n_positions"] = 1 << 20;
  }));
  EXPECT_NE(e.find("has shape"), std::string::npos) << e;
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 10.0);
}

TEST_F(HfImportTest, DeepNestingAndDuplicateKeysAreRefused) {
  const std::string cfg = (dir_ / "config.json").string();
  std::string deep = config_.dump();
  deep.insert(deep.size() - 1, ",\"x\":" + std::string(1000000, '[') + std::string(1000000, ']'));
  std::string e = error_for(deep);
  EXPECT_NE(e.find("more than 16 levels deep"), std::string::npos) << e;
  EXPECT_NE(e.find(cfg), std::string::npos) << e;
  std::string twice = config_.dump();
  twice.insert(twice.size() - 1, ",\"n_layer\":1");
  e = error_for(twice);
  EXPECT_NE(e.find("the key 'n_layer' appears twice"), std::string::npos) << e;
  e = error_for("{\"n_layer\": 1,");
  EXPECT_NE(e.find(cfg + "' is not valid JSON (byte 14)"), std::string::npos) << e;
}

}  // namespace
}  // namespace meshtrain::launch
