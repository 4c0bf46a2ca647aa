"""trt: TensorRT-LLM engines through the TensorRT-engine path of tensorrt-llm 1.2.x.

config.py   runtime settings (backend.*), the schema Hydra validates
options.py  pure mapping: engine.* options -> BuildConfig / PluginConfig / trtllm-build, and the builder's
            silent overrides; no tensorrt_llm needed, so it is tested everywhere
runtime.py  tensorrt_llm itself: its version, import, log capture and streamed responses
backend.py  the Backend: check, build, load, serve
"""
