"""Inference engines for the `embed` python-backend model (copied into the model's version directory).

Each engine runs padded token batches through the encoder graph (pooling and L2 normalization inside)
and returns float32 (n, dim) embeddings:

    OrtEngine       ONNX Runtime: CPU, or CUDA (IO binding: inputs copied once, the output bound on the
                    device and copied back once), or TensorRT when asked for and available.
    OpenVinoEngine  OpenVINO on CPU (the NNCF int8 IR written by `embedline export --openvino`); with
                    streams > 1 the length groups of one dynamic batch (or row slices of a lone group)
                    run as parallel infer requests, one per stream.

`run_many(batches)` takes a list of (input_ids, attention_mask) int64 arrays, one per length group, and
returns one embeddings array per group, so an engine may overlap groups where it can.
"""

import os

import numpy as np

OUTPUT = "sentence_embedding"


class OrtEngine:
    def __init__(self, path, threads, gpu_device_id=None, gpu_provider="cuda", spin_wait=True):
        import onnxruntime as ort

        from ort_options import session_options  # copied next to this file by the repository builder

        options = session_options(ort, threads, spin_wait)
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        self.device_id = None
        if gpu_device_id is not None and "CUDAExecutionProvider" in available:
            self.device_id = int(gpu_device_id)
            cuda = ("CUDAExecutionProvider", {"device_id": self.device_id})
            providers = [cuda, "CPUExecutionProvider"]
            if gpu_provider == "tensorrt" and "TensorrtExecutionProvider" in available:
                # TensorRT builds an engine per input shape range; fused com.microsoft ops fall back to CUDA.
                cache = os.path.join(os.path.dirname(path), "trt_cache")
                providers.insert(0, ("TensorrtExecutionProvider", {
                    "device_id": self.device_id, "trt_fp16_enable": True,
                    "trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
                }))
        self.session = ort.InferenceSession(path, options, providers=providers)
        self.on_gpu = self.device_id is not None and self.session.get_providers()[0] != "CPUExecutionProvider"

    def run(self, input_ids, attention_mask):
        if self.on_gpu:
            # IO binding: the output stays on the device until one copy back, instead of ORT's own
            # per-run host allocation and copy; inputs are copied to the device once.
            binding = self.session.io_binding()
            binding.bind_cpu_input("input_ids", input_ids)
            binding.bind_cpu_input("attention_mask", attention_mask)
            binding.bind_output(OUTPUT, "cuda", self.device_id)
            self.session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()[0]
        return self.session.run([OUTPUT], {"input_ids": input_ids, "attention_mask": attention_mask})[0]

    def run_many(self, batches):
        return [self.run(input_ids, attention_mask) for input_ids, attention_mask in batches]


class OpenVinoEngine:
    def __init__(self, path, threads, streams=1, cache_shapes=100):
        import openvino as ov

        core = ov.Core()
        config = {
            "INFERENCE_NUM_THREADS": int(threads) if threads else 0,
            "NUM_STREAMS": int(streams),
            # Shared machines: pinning threads to cores fights the other processes' schedulers.
            "ENABLE_CPU_PINNING": False,
            # Compiled kernels are kept per input shape; the plugin's default of 5,000 shapes grows a
            # process under mixed traffic by GBs. 0 keeps none and is both slower and larger (fragmentation).
            "CPU_RUNTIME_CACHE_CAPACITY": int(cache_shapes),
        }
        self.compiled = core.compile_model(path, "CPU", config)
        self.streams = int(streams)
        self.request = self.compiled.create_infer_request()
        self.queue = ov.AsyncInferQueue(self.compiled, self.streams) if self.streams > 1 else None

    def run(self, input_ids, attention_mask):
        self.request.infer({"input_ids": input_ids, "attention_mask": attention_mask})
        return self.request.get_tensor(OUTPUT).data.copy()

    def run_many(self, batches):
        if self.queue is None:
            return [self.run(input_ids, attention_mask) for input_ids, attention_mask in batches]
        # Each stream runs one request on its share of the threads: give every stream work by cutting the
        # groups into row slices when there are fewer groups than streams (slices keep their padding).
        pieces = []  # (group index, input_ids, attention_mask)
        for index, (input_ids, attention_mask) in enumerate(batches):
            parts = self.streams if len(batches) < self.streams and len(input_ids) >= 2 * self.streams else 1
            for rows in np.array_split(np.arange(len(input_ids)), parts):
                pieces.append((index, input_ids[rows], attention_mask[rows]))
        results = [None] * len(pieces)

        def done(request, position):
            results[position] = request.get_tensor(OUTPUT).data.copy()

        self.queue.set_callback(done)
        for position, (_, input_ids, attention_mask) in enumerate(pieces):
            self.queue.start_async({"input_ids": input_ids, "attention_mask": attention_mask}, position)
        self.queue.wait_all()
        outputs = [[] for _ in batches]
        for (index, _, _), result in zip(pieces, results):
            outputs[index].append(result)
        return [parts[0] if len(parts) == 1 else np.concatenate(parts) for parts in outputs]


def load_engine(directory, params, gpu_device_id=None):
    """The engine named by the config's `engine` parameter, on the model file in `directory`."""
    engine = params["engine"]
    threads = int(params["intra_op_threads"])
    if engine == "openvino":
        return OpenVinoEngine(os.path.join(directory, "model.xml"), threads, int(params["streams"]),
                              int(params["engine_cache_shapes"]))
    if engine != "onnxruntime":
        raise ValueError(f"unknown engine {engine!r} in the model config (expected onnxruntime or openvino)")
    return OrtEngine(os.path.join(directory, "model.onnx"), threads, gpu_device_id,
                     params["gpu_provider"], params["spin_wait"] == "true")
