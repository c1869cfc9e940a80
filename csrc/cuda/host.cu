// Registration of the CUDA ops, and the launch plan exported to the report (make cuda-report):
// the plan comes from the same planner the launches use (launch_plan.cu), fed with a device
// model and the kernels' registers from the disassembly instead of a live GPU.
#include <torch/library.h>

#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "host_common.cuh"

namespace dsnt_cuda {

std::string cuda_launch_plan_json(int64_t batch, int64_t keypoints, const std::vector<int64_t>& spatial,
                                  int64_t elem_size, bool backward, const std::map<std::string, int64_t>& registers,
                                  int64_t sms, int64_t max_cluster) {
  PlanInput in;
  in.dims = static_cast<int>(spatial.size());
  TORCH_CHECK_VALUE(in.dims >= 1 && in.dims <= kMaxSpatialDims, "cuda_launch_plan: 1 to 3 spatial sizes");
  int64_t stride = 1;
  for (int k = 0; k < in.dims; ++k) {  // x is the last tensor dim; contiguous logits
    in.size[k] = spatial[spatial.size() - 1 - k];
    in.stride[k] = stride;
    stride *= in.size[k];
  }
  in.maps = batch * keypoints;
  in.elem_size = static_cast<int>(elem_size);
  in.backward = backward;
  const std::string dir = backward ? "bwd_" : "fwd_";
  auto regs = [&](const char* cls) {
    const auto it = registers.find(dir + cls);
    return it == registers.end() ? 64 : static_cast<int>(it->second);
  };
  DeviceInfo dev;
  dev.sms = static_cast<int>(sms);
  dev.max_cluster = static_cast<int>(max_cluster);
  dev.ctas_per_sm = [&](SizeClass c, bool bwd, int threads, size_t smem) {
    const char* name = c == SizeClass::Warp ? "warp" : (c == SizeClass::Block || bwd ? "block" :
                       (c == SizeClass::Cluster ? "cluster" : "streamed"));
    return model_ctas_per_sm(regs(name), threads, smem);
  };
  // model: the GPU's resident CTAs grouped into clusters (the occupancy API refines it on a GPU)
  dev.max_active_clusters = [&](int cluster, int threads, size_t smem) {
    return dev.sms * model_ctas_per_sm(regs("cluster"), threads, smem) / cluster;
  };
  const LaunchPlan p = plan_launch(in, dev);
  std::ostringstream o;
  o << "{\"class\": \"" << size_class_name(p.cls, backward) << "\", \"threads\": " << p.threads
    << ", \"maps_per_cta\": " << p.groups_per_cta << ", \"ctas_per_map\": " << p.slices
    << ", \"cluster\": " << p.cluster << ", \"ctas\": " << p.ctas << ", \"ctas_per_sm\": " << p.ctas_per_sm
    << ", \"resident_ctas\": " << p.resident << ", \"waves\": " << p.waves
    << ", \"last_wave_idle\": " << p.last_wave_idle << ", \"hbm_reads\": " << p.hbm_reads
    << ", \"hbm_writes\": " << p.hbm_writes << ", \"smem\": " << p.smem
    << ", \"launch_bound\": " << (p.launch_bound ? "true" : "false") << ", \"group\": " << p.layout.group
    << ", \"cols\": " << p.layout.cols << ", \"tile_rows\": " << p.layout.tile_rows
    << ", \"vrows\": " << p.layout.vrows << ", \"slice_vrows\": " << p.layout.slice_vrows
    << ", \"elements_per_thread\": " << p.layout.chunks * p.layout.vec << "}";
  return o.str();
}

}  // namespace dsnt_cuda

TORCH_LIBRARY_IMPL(dsnt_cuda, DSNT_CUDA_DISPATCH_KEY, m) {
  m.impl("dsnt_fwd", &dsnt_cuda::dsnt_fwd_cuda);
  m.impl("dsnt_bwd", &dsnt_cuda::dsnt_bwd_cuda);
}
