// vmeanba-runner: load an AOTInductor package written by `vmeanba export` and run it, without Python.
//
// Usage: vmeanba-runner PACKAGE.pt2 INPUTS.pt OUTPUTS.pt [--op-library PATH] [--threads N] [--repeats N]
//
// INPUTS.pt holds the model's positional inputs as one list of tensors, as `torch.save([x], path)`
// writes it; OUTPUTS.pt receives the outputs as a tuple of tensors (read it with `torch.load`). The package's
// scan calls go straight to the C functions of the vmeanba op library (docs/DEPLOY.md), so that
// library must be loaded first: --op-library names it (or put its folder on LD_LIBRARY_PATH).
// --repeats N runs the model N more times after a warm-up and prints the median time in ms; --threads
// sets the intra-op threads (OpenMP) the Inductor kernels and the scan use.
#include <ATen/Parallel.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Options {
  std::string package, inputs, outputs, op_library;
  int threads = 0;
  int repeats = 0;
};

[[noreturn]] void usage(const std::string& problem) {
  throw std::invalid_argument(problem + "\nusage: vmeanba-runner PACKAGE.pt2 INPUTS.pt OUTPUTS.pt "
                              "[--op-library PATH] [--threads N] [--repeats N]");
}

Options parse(int argc, char** argv) {
  Options options;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--op-library") options.op_library = value();
    else if (arg == "--threads") options.threads = std::stoi(value());
    else if (arg == "--repeats") options.repeats = std::stoi(value());
    else if (arg.rfind("--", 0) == 0) usage("unknown option " + arg);
    else positional.push_back(arg);
  }
  if (positional.size() != 3) usage("expected PACKAGE.pt2 INPUTS.pt OUTPUTS.pt");
  options.package = positional[0];
  options.inputs = positional[1];
  options.outputs = positional[2];
  return options;
}

std::vector<char> read_file(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot read " + path);
  return {std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
}

std::vector<at::Tensor> read_inputs(const std::string& path) {
  c10::IValue value = torch::jit::pickle_load(read_file(path));
  std::vector<at::Tensor> inputs;
  if (value.isTensor()) {
    inputs.push_back(value.toTensor());
  } else if (value.isList() || value.isTuple()) {
    for (const c10::IValue& item : value.isList() ? value.toListRef() : value.toTupleRef().elements()) {
      if (!item.isTensor()) throw std::runtime_error(path + ": every input must be a tensor");
      inputs.push_back(item.toTensor());
    }
  } else {
    throw std::runtime_error(path + ": expected a tensor or a list of tensors, as torch.save([x], path) writes");
  }
  return inputs;
}

void write_outputs(const std::string& path, const std::vector<at::Tensor>& outputs) {
  // a tuple, which torch.load reads with its default weights_only=True (a typed tensor list would not)
  std::vector<c10::IValue> items(outputs.begin(), outputs.end());
  std::vector<char> bytes = torch::jit::pickle_save(c10::ivalue::Tuple::create(std::move(items)));
  std::ofstream file(path, std::ios::binary);
  file.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!file) throw std::runtime_error("cannot write " + path);
}

double median_ms(torch::inductor::AOTIModelPackageLoader& loader, const std::vector<at::Tensor>& inputs,
                 int repeats) {
  std::vector<double> times;
  for (int i = 0; i < repeats; ++i) {
    auto start = std::chrono::steady_clock::now();
    loader.run(inputs);
    times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Options options = parse(argc, argv);
    if (!options.op_library.empty() && !dlopen(options.op_library.c_str(), RTLD_NOW | RTLD_GLOBAL)) {
      throw std::runtime_error(std::string("cannot load the op library: ") + dlerror());
    }
    if (options.threads > 0) at::set_num_threads(options.threads);
    torch::inductor::AOTIModelPackageLoader loader(options.package);
    std::vector<at::Tensor> inputs = read_inputs(options.inputs);
    std::vector<at::Tensor> outputs = loader.run(inputs);
    write_outputs(options.outputs, outputs);
    if (options.repeats > 0) {
      std::printf("median_ms %.6f repeats %d threads %d\n", median_ms(loader, inputs, options.repeats),
                  options.repeats, at::get_num_threads());
    }
    return 0;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "vmeanba-runner: %s\n", error.what());
    return 1;
  }
}
