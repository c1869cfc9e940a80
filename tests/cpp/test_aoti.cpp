// Second half of the ctest `test_aoti`: load the AOTInductor package made by
// tests/cpp/aoti_export.py and run it from C++, no Python, with the dsnt_cuda ops registered by
// libdsnt_cuda_ops (linked --no-as-needed); check the outputs against eager PyTorch's.
//
//   test_aoti DIR    (DIR holds dsnt_model.pt2 and dsnt_io.pt)
//
// The package calls our op through AOTInductor's proxy executor: it looks the op up in the
// dispatcher by name ("dsnt_cuda::dsnt_fwd") and calls it boxed, with the string / float / bool
// arguments recorded in the package. So the op must be registered in this process, with the schema
// the package was exported against. Exits 0 when every check passes, 1 otherwise.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <dlfcn.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <cstdio>
#include <exception>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in, "cannot read ", path, " (run tests/cpp/aoti_export.py first)");
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::vector<at::Tensor> tensors(const c10::IValue& list) {
  std::vector<at::Tensor> out;
  for (const auto& t : list.toListRef()) out.push_back(t.toTensor());
  return out;
}

// The ops the package calls, as recorded at export: registered here, with the same schema.
// A mismatch means the Python extension and this library were built from different sources.
bool check_ops(const c10::IValue& ops) {
  bool ok = !ops.toListRef().empty();
  expect(ok, "the package calls at least one dsnt_cuda op");
  for (const auto& entry : ops.toListRef()) {
    const auto& fields = entry.toListRef();
    const std::string name = fields[0].toStringRef(), overload = fields[1].toStringRef();
    const std::string exported = fields[2].toStringRef();
    auto op = c10::Dispatcher::singleton().findSchema({name, overload});
    std::ostringstream here;
    if (op) here << op->schema();
    const bool same = op.has_value() && here.str() == exported;
    expect(same, "op " + name + " registered with the exported schema");
    if (!same) {
      std::printf("     exported: %s\n     here:     %s\n", exported.c_str(),
                  op ? here.str().c_str() : "(not registered)");
      ok = false;
    }
  }
  return ok;
}

void compare(const std::vector<at::Tensor>& got, const std::vector<at::Tensor>& expected,
             const std::string& what) {
  if (got.size() != expected.size()) {
    expect(false, what + ": " + std::to_string(got.size()) + " outputs, expected " +
                      std::to_string(expected.size()));
    return;
  }
  for (size_t i = 0; i < got.size(); ++i) {
    const auto& g = got[i];
    const auto& e = expected[i];
    const std::string name = what + ", output " + std::to_string(i);
    if (g.sizes() != e.sizes() || g.scalar_type() != e.scalar_type()) {
      std::ostringstream msg;
      msg << name << ": got " << g.sizes() << " " << g.scalar_type() << ", expected " << e.sizes() << " "
          << e.scalar_type();
      expect(false, msg.str());
      continue;
    }
    // Inductor's own kernels (the loss arithmetic) may round differently from eager's.
    const bool close = g.allclose(e, /*rtol=*/1e-5, /*atol=*/1e-6);
    std::ostringstream msg;
    msg << name << " " << e.sizes() << " matches eager";
    if (!close) msg << " (max |diff| " << g.sub(e).abs().max().item<double>() << ")";
    expect(close, msg.str());
  }
}

int run(const std::string& dir) {
  // The ops come from our library, linked --no-as-needed (no Python here, so no dsnt_cuda._C).
  expect(dlopen("libdsnt_cuda_ops.so", RTLD_NOW | RTLD_NOLOAD) != nullptr,
         "libdsnt_cuda_ops.so is loaded in this process");

  const c10::IValue io = torch::jit::pickle_load(read_file(dir + "/dsnt_io.pt"));
  const auto dict = io.toGenericDict();
  if (!check_ops(dict.at("ops"))) return 1;  // the package's calls would not match the schema

  torch::inductor::AOTIModelPackageLoader loader(dir + "/dsnt_model.pt2");
  int index = 0;
  for (const auto& c : dict.at("cases").toListRef()) {
    const auto& pair = c.toListRef();
    const auto inputs = tensors(pair[0]);
    const auto expected = tensors(pair[1]);
    std::ostringstream what;
    what << "case " << index++ << " images " << inputs[0].sizes();
    compare(loader.run(inputs), expected, what.str());
  }
  expect(index > 0, "the data file holds at least one case");
  return failures == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR (with dsnt_model.pt2 and dsnt_io.pt)\n", argv[0]);
    return 2;
  }
  try {
    return run(argv[1]);
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "FAIL %s\n", e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FAIL %s\n", e.what());
    return 1;
  }
}
