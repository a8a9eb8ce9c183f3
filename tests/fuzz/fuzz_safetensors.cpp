// Fuzz target: safetensors files (runtime/safetensors.hpp), from memory (parse_safetensors) and
// from a file (load_safetensors), which must agree; then as model.init weights (load_weights)
// of a small model.
#include <cstring>
#include <set>

#include "launch/weights.hpp"
#include "runtime/safetensors.hpp"
#include "tests/fuzz/fuzz.hpp"

namespace meshtrain::fuzz {
namespace {

models::GPTConfig small_model() {
  models::GPTConfig c;
  c.n_layer = 1;
  c.n_head = 2;
  c.n_embd = 8;
  c.block_size = 8;
  c.vocab_size = 256;
  c.padded_vocab = 256;
  return c;
}

models::Decoder& model() {
  static models::Decoder* m = new models::Decoder(small_model(), PrecisionPolicy::parse("fp32"));
  return *m;
}

}  // namespace

void write_seeds(const std::string& dir) {
  auto ramp = [](const Shape& shape, DType dtype, float scale) {
    std::vector<float> v(static_cast<std::size_t>(shape.numel()));
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = scale * static_cast<float>(i % 97) - 1.0f;
    return Tensor::from_floats(v, shape, dtype);
  };
  std::vector<std::int32_t> ids = {0, 7, -3, 50256};
  save_safetensors(dir + "/seed-dtypes.safetensors",
                   {{"a.f32", ramp(Shape{2, 3}, DType::kF32, 0.25f)},
                    {"b.bf16", ramp(Shape{4}, DType::kBF16, 0.5f)},
                    {"c.f16", ramp(Shape{2, 1, 2}, DType::kF16, 0.125f)},
                    {"d.i32", Tensor::from_ints(ids, Shape{4})},
                    {"e.empty", Tensor::empty(Shape{0, 5}, DType::kF32)},
                    {"f.scalar", ramp(Shape{}, DType::kF32, 1.0f)}},
                   {{"format", "pt"}, {"note", "fuzz seed"}});
  save_safetensors(dir + "/seed-empty.safetensors", {});
  // A model.safetensors as Trainer::run writes it (meshtrain names, fp32 master weights).
  models::Decoder& m = model();
  Tensor flat = m.flat_params();  // fp32: the master weights
  std::vector<float> v(static_cast<std::size_t>(flat.numel()));
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = 0.001f * static_cast<float>(i % 1000);
  flat.copy_from(Tensor::from_floats(v, flat.shape(), DType::kF32));
  std::vector<std::pair<std::string, Tensor>> weights;
  for (std::size_t i = 0; i < m.params().size(); ++i)
    weights.emplace_back(m.params()[i].name, m.param(i));
  save_safetensors(dir + "/seed-model.safetensors", weights);
}

}  // namespace meshtrain::fuzz

using namespace meshtrain;

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::init();
  fuzz::model();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string path = fuzz::scratch_dir() + "/input.safetensors";
  fuzz::write_file(path, data, size);
  SafetensorsFile mem;
  std::string mem_error;
  bool ok = false;
  try {
    mem = parse_safetensors(path, data, size);
    ok = true;
  } catch (const InternalError& e) {
    fuzz::finding(std::string("internal error: ") + e.what());
  } catch (const Error& e) {
    mem_error = e.what();
    FUZZ_EXPECT(mem_error.find(path) != std::string::npos, "error without the file: {}", mem_error);
  }
  // The file reader must give the same answer.
  fuzz::accepts(path, [&] {
    try {
      const SafetensorsFile file = load_safetensors(path);
      FUZZ_EXPECT(ok, "load_safetensors accepted what parse_safetensors refused: {}", mem_error);
      FUZZ_EXPECT(file.tensors.size() == mem.tensors.size(), "{} vs {} tensors",
                  file.tensors.size(), mem.tensors.size());
      FUZZ_EXPECT(file.metadata == mem.metadata, "metadata differ");
      for (std::size_t i = 0; i < file.tensors.size(); ++i) {
        const Tensor& a = file.tensors[i].second;
        const Tensor& b = mem.tensors[i].second;
        FUZZ_EXPECT(file.tensors[i].first == mem.tensors[i].first && a.shape() == b.shape() &&
                        a.dtype() == b.dtype() && std::memcmp(a.data(), b.data(), a.nbytes()) == 0,
                    "tensor {} differs", i);
      }
    } catch (const InternalError&) {
      throw;
    } catch (const Error& e) {
      FUZZ_EXPECT(!ok && std::string(e.what()) == mem_error,
                  "load_safetensors refused with '{}', parse_safetensors said '{}'", e.what(),
                  ok ? "(accepted)" : mem_error);
      throw;
    }
  });
  fuzz::g_accepted = ok;
  if (!ok) return 0;

  // What was accepted tiles the data section exactly, with unique names.
  FUZZ_EXPECT(size >= 8, "{} bytes accepted", size);
  std::uint64_t header_len = 0;
  for (int i = 0; i < 8; ++i) header_len |= static_cast<std::uint64_t>(data[i]) << (8 * i);
  std::uint64_t total = 0;
  std::set<std::string> names;
  for (const auto& [name, t] : mem.tensors) {
    FUZZ_EXPECT(names.insert(name).second, "'{}' twice", name);
    FUZZ_EXPECT(mem.find(name) == &t, "find('{}')", name);
    total += t.nbytes();
  }
  FUZZ_EXPECT(8 + header_len + total == size, "header {} + tensors {} != {} bytes", header_len,
              total, size);

  // As the weights of model.init.
  fuzz::accepts(path, [&] { launch::load_weights(fuzz::model(), path); });
  return 0;
}
