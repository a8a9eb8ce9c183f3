// Fuzz target: distributed checkpoint manifests (parallel/checkpoint.hpp) and the trainer's state
// in them (launch/checkpointing.hpp). At start-up a small model's checkpoint is written with the
// real writer (several pieces per tensor); each input replaces its manifest.json, which is then
// read as resuming reads it: read_checkpoint_info, parse_checkpoint_state, verify_checkpoint, and
// load_checkpoint of the master weights and Adam state at TP 1 and for both ranks of TP 2, with
// ZeRO-1-like targets held as runs. The shard files stay as written, so mutations reach the piece
// arithmetic behind the checksums. Each input is also read sealed (its manifest_crc32c set to its
// content's checksum), so that mutations get past the manifest's own checksum.
#include <filesystem>

#include "launch/checkpointing.hpp"
#include "parallel/checkpoint.hpp"
#include "parallel/checkpoint_manifest.hpp"
#include "tests/fuzz/fuzz.hpp"

namespace meshtrain::fuzz {
namespace {

struct Setup {
  models::GPTConfig model;
  std::vector<parallel::ParamSlot> tp1, tp2;
  std::int64_t n1 = 0, n2 = 0;
  std::string root, dir;
};

models::GPTConfig small_model() {
  models::GPTConfig c;
  c.n_layer = 1;
  c.n_head = 2;
  c.n_embd = 8;
  c.block_size = 4;
  c.vocab_size = 200;  // padded to 256: wte has padding rows
  c.padded_vocab = 256;
  return c;
}

// The layout of a TP rank of `tp` (the same on every rank) and its flat element count.
std::vector<parallel::ParamSlot> slots_for(const models::GPTConfig& c, int tp,
                                           std::int64_t* numel) {
  std::vector<parallel::ParamSlot> out = models::GPT::param_layout(c, tp);
  *numel = out.back().offset + out.back().numel();
  return out;
}

Tensor values(std::int64_t n, float scale) {
  std::vector<float> v(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = scale * static_cast<float>(i % 1000);
  return Tensor::from_floats(v, Shape{n}, DType::kF32);
}

Setup& setup() {
  static Setup* s = [] {
    auto* s = new Setup;
    s->model = small_model();
    s->tp1 = slots_for(s->model, 1, &s->n1);
    s->tp2 = slots_for(s->model, 2, &s->n2);
    s->root = scratch_dir() + "/checkpoints";
    std::filesystem::create_directories(s->root);
    launch::CheckpointState st;
    st.model = s->model;
    st.precision = "bf16";
    st.seed = 1337;
    st.skipped_steps = 1;
    st.loss_scale = 65536.0f;
    st.clean_steps = 3;
    st.batch_size = 4;
    st.grad_accum = 2;
    st.seq_len = 4;
    st.dp = 1;
    // A fixed config.toml (its checksum is in the seed manifest; to_toml() changes with every
    // new config key).
    const std::string config_toml = "[model]\npreset = \"gpt-tiny\"\n";
    parallel::Mesh mesh;
    const std::int64_t n = s->n1;
    // Uneven write ranges: pieces start and end inside rows and tensors.
    const std::vector<parallel::FlatRun> write = {
        {0, 0, n / 3}, {n / 3, 0, 77}, {n / 3 + 77, 0, n - n / 3 - 77}};
    parallel::CheckpointWrite w;
    w.root = s->root;
    w.step = 7;
    w.slots = s->tp1;
    w.states = {{"master", values(n, 0.5f), {}},
                {"adam_m", values(n, 0.25f), {}},
                {"adam_v", values(n, 0.125f), {}}};
    w.writes = write;
    w.state_json = launch::checkpoint_state_json(st);
    w.config_toml = config_toml;
    s->dir = parallel::save_checkpoint(mesh, w);
    return s;
  }();
  return *s;
}

}  // namespace

void write_seeds(const std::string& dir) {
  const std::string text = read_file(setup().dir + "/manifest.json");
  write_file(dir + "/seed-manifest.json", text.data(), text.size());
}

}  // namespace meshtrain::fuzz

using namespace meshtrain;

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::init();
  fuzz::setup();
  return 0;
}

namespace {

// Reads the checkpoint with `text` as its manifest, as resuming reads it; whether it was accepted.
bool read_with_manifest(const std::string& text) {
  fuzz::Setup& s = fuzz::setup();
  fuzz::write_file(s.dir + "/manifest.json", text.data(), text.size());
  bool ok = fuzz::accepts(s.dir, [&] {
    const parallel::CheckpointInfo info = parallel::read_checkpoint_info(s.dir);
    const launch::CheckpointState st =
        launch::parse_checkpoint_state(s.dir, info.state_json, s.model);
    FUZZ_EXPECT(std::isfinite(st.loss_scale) && st.loss_scale > 0, "scale {}", st.loss_scale);
  });
  ok = fuzz::accepts(s.dir, [&] { parallel::verify_checkpoint(s.dir); }) && ok;
  // This rank's buffers, a little longer than the model (elements beyond it are left alone).
  auto load = [&](const std::vector<parallel::ParamSlot>& slots, std::int64_t n, int rank, int tp) {
    return fuzz::accepts(s.dir, [&] {
      Tensor master = Tensor::zeros(Shape{n + 3}, DType::kF32);
      Tensor m = Tensor::zeros(Shape{n}, DType::kF32), v = Tensor::zeros(Shape{n}, DType::kF32);
      // adam_m as two runs in reverse order (ZeRO-1 owned runs), adam_v from flat 1 on.
      const std::int64_t half = n / 2;
      const std::vector<parallel::FlatRun> runs = {{half, 0, n - half}, {0, n - half, half}};
      parallel::load_checkpoint(s.dir, slots,
                                {{"master", master, {}},
                                 {"adam_m", m, runs},
                                 {"adam_v", v.slice(1, n - 1), {{1, 0, n - 1}}}},
                                rank, tp);
      const std::vector<float> tail = master.slice(n, 3).to_floats();
      FUZZ_EXPECT(tail[0] == 0 && tail[1] == 0 && tail[2] == 0, "wrote past the model");
    });
  };
  ok = load(s.tp1, s.n1, 0, 1) && ok;
  for (int r = 0; r < 2; ++r) ok = load(s.tp2, s.n2, r, 2) && ok;
  return ok;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  fuzz::g_accepted = read_with_manifest(text);
  // The manifest's own checksum refuses nearly every mutation: the input sealed again (when it is
  // a JSON object) reaches the checks behind it.
  std::string sealed;
  try {
    sealed = parallel::ckpt::seal_manifest(text);
  } catch (const Error&) {
  }
  if (!sealed.empty() && sealed != text) read_with_manifest(sealed);
  return 0;
}
