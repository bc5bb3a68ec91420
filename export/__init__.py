"""The export stage (installed as `embedline.export`): artifact -> parity-checked ONNX variants.

    onnx_export.py   fp32 graph traced from the torch encoder (pooling + L2 normalize inside)
    graphs.py        fused / fp16 / int8 graphs derived from it with ONNX Runtime's tools
    openvino_int8.py the optional OpenVINO NNCF int8 variant and its length-spread calibration set
    parity.py        cosine to torch and CPU speed of each variant (tolerances: embedline/variants.py)
    sts.py           STS Spearman of each variant (--sts-file)
    pipeline.py      export_artifact: all of the above into <artifact>/onnx/ + the records; a variant other
                     than fp32 outside its tolerance is rejected (recorded, files removed), not an error
    ensure.py        ensure_exported: export an artifact only when it has not been (the server launcher)
    cli.py           `embedline export`

Nothing is imported here, so `embedline.export.ensure` stays cheap for the server launcher. Which variant
serves, and what each must reach, is embedline/variants.py, below both export and serving.
"""
