"""Check, on a machine's own vLLM, that the ingress's front end works where the ingress runs (no GPU visible).

Builds ``deployments.rendering.Frontend`` for the first model of a config, renders a chat with a tool,
tokenizes a completion prompt, builds SamplingParams (plain, JSON schema, logprobs) and pickles the
``GenerateRequest`` that would go to a replica. Prints one line per step and exits 1 on the first failure.
Run it with ``CUDA_VISIBLE_DEVICES=`` to see what an ingress replica (num_gpus 0) sees.

    CUDA_VISIBLE_DEVICES= python3 benchmarks/gpu/check_frontend.py configs/gpu.yaml
"""

from __future__ import annotations

import pickle
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main(config: str) -> int:
    from deployments.openai_api import ChatCompletionRequest, CompletionRequest
    from deployments.protocol import GenerateRequest
    from deployments.rendering import Frontend
    from serve_app.config import load_serve_config

    _, apps = load_serve_config(ROOT / config)
    model = apps[0].models[0]
    t0 = time.perf_counter()
    fe = Frontend(model)
    print(f"frontend of {model.id} built in {time.perf_counter() - t0:.1f} s", flush=True)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    chat = ChatCompletionRequest.model_validate({
        "model": model.id, "messages": [{"role": "developer", "content": "Be brief."},
                                        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]}],
        "tools": [tool], "tool_choice": "required", "max_tokens": 32})
    rendered = fe.render_chat(chat)
    print(f"chat rendered: {len(rendered.token_ids)} tokens", flush=True)
    params = fe.sampling(chat, 32)
    print(f"sampling (required tool): {params.structured_outputs is not None and 'structured' or 'plain'}", flush=True)
    comp = CompletionRequest.model_validate({"model": model.id, "prompt": "Hello " * 50, "max_tokens": 8,
                                             "logprobs": 2, "response_format": {"type": "json_object"}})
    prompts = fe.render_prompts(comp)
    p2 = fe.sampling(comp, 8)
    req = GenerateRequest(request_id="x", model_id=model.id, prompt_token_ids=prompts[0], sampling=p2)
    blob = pickle.dumps(req)
    print(f"completion: {len(prompts[0])} tokens, logprobs={p2.logprobs}, GenerateRequest pickles to {len(blob)} B",
          flush=True)
    pickle.loads(blob)
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "configs/gpu.yaml"))
