"""The export stage (installed as `embedline.export`): artifact -> parity-checked ONNX variants.

    onnx_export.py   fp32 graph traced from the torch encoder (pooling + L2 normalize inside)
    graphs.py        fused / fp16 / int8 graphs derived from it with ONNX Runtime's tools
    parity.py        cosine to torch and CPU speed of each variant; tolerances
    pipeline.py      export_artifact: all of the above into <artifact>/onnx/ + the records
    variants.py      choose_variant, available_device, ensure_exported (used by the server launcher)
    cli.py           `embedline export`

Nothing is imported here, so `embedline.export.variants` stays cheap for the server launcher.
"""
