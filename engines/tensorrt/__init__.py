"""TensorRT engines built from the exported ONNX with Polygraphy's loaders (DESIGN.md section 6).

The build is Polygraphy's lazy loader chain, composed as its own tools compose it:
`SaveEngine(EngineFromNetwork(NetworkFromOnnxPath(onnx), config=CreateConfig(...)))`, nothing run
until the last loader is called. `NetworkFromOnnxPath` parses with `parse_from_file`, so weights
stored as external data resolve beside the ONNX. Running an engine is Polygraphy's `TrtRunner`
under our `ContractRunner`, so a TensorRT call is checked exactly as an ONNX Runtime call is.

Everything up to the builder call is pure and tested here without TensorRT (its libraries are not on
PyPI): the engine settings (profiles from the ONNX inputs, aux streams from the plan), the loader
objects and their arguments, and the scripts written beside the ONNX for a GPU host —
`build_engine.sh` (`polygraphy convert` with the same settings), `check_engine.sh` (`polygraphy run
--onnxrt --trt`) and `data_loader.py` (its feeds).

Two optimization profiles, in this order (the runner picks by the past length):
  0 prefill: batch x seq, past = 0 (min = opt = max = 0; TensorRT takes empty tensors);
  1 decode:  batch x past, seq = 1.
Auxiliary streams: a group of p layers is p independent branches, so `max_aux_streams` defaults to
the largest group size minus one, read from the plan in the ONNX metadata.

By role: `options` (what the user asks), `settings` (profiles, aux streams), `build` (the loaders and the build), `script`
(the files for a GPU host), `runner` (running a built engine).
"""
