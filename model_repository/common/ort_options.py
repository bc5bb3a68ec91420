"""ONNX Runtime session options: the one definition every ONNX Runtime engine of embedline uses.

The server's models load it from their own directory (the repository builder copies it next to model.py,
so a model directory stays self-contained); the export's parity and speed check and the benchmarks'
in-process engines import it as `embedline.model_repository.common.ort_options`, so an in-process number
is measured with the options the server runs.
"""


def session_options(ort, threads, spin_wait=True, quiet=False):
    """SessionOptions with pinned threads. `ort` is the onnxruntime module (passed in: this file imports
    nothing, so every caller keeps its own import)."""
    options = ort.SessionOptions()
    # Pinned: unpinned pools oversubscribe shared cores and collapse (docs/architecture.md, thread pinning).
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # one graph at a time per session: extra pools only oversubscribe
    # Spinning workers pick up each operator's parallel work at once instead of waking from a futex:
    # 1.6x faster batch-1 runs on 2 cores (serving/settings.py, RepositorySettings.spin_wait).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if quiet:
        options.log_severity_level = 3  # fp16 graphs on CPU log a warning per inserted Cast
    return options
