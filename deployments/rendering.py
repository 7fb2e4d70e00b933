"""The OpenAI front end of one model, on vLLM's own pieces: a request becomes token ids and SamplingParams.

Owns: ``Frontend`` (per model: vLLM's ``ModelConfig`` and tokenizer, the configured chat template, the
tool/reasoning parser class from vLLM's ``ParserManager`` and the model's default sampling parameters
from its generation config) and ``RenderedChat``. ``render_chat`` follows vLLM's ``OnlineRenderer``:
vLLM's ``parse_chat_messages`` (developer role, multi-part text, tool calls and tool results in
history), ``safe_apply_chat_template`` (tools, ``continue_final_message``, chat template kwargs) and the
parser's ``adjust_request`` (structured outputs for forced tool calls, reasoning). ``render_prompts``
tokenizes completion prompts; ``sampling`` is vLLM's ``to_sampling_params`` in delta mode;
``chat_output`` / ``completion_output`` say what the request asked of its output (``choices.OutputSpec``).

One departure from ``vllm serve``: tool_choice ``required`` or a named function works without a
tool-call parser. The output is then constrained to the tools' JSON schema (vLLM's
``get_json_schema_from_tools``, as its tool parsers do) and read back as tool calls by
``deployments.choices``.

The methods are synchronous and CPU-bound: the ingress runs them inline for short requests and on the
model's preparation thread for long ones. Every refusal is an ``APIError`` 400.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any

from deployments.choices import OutputSpec
from deployments.engine import client_errors
from deployments.openai_api import APIError
from serve_app.config import ModelConfig

logger = logging.getLogger(__name__)

#: Content part types of a text-only model (vLLM's names for text).
_TEXT_PARTS = frozenset({"text", "input_text", "output_text", "refusal", "thinking"})


@dataclass(slots=True)
class RenderedChat:
    """A rendered chat request: its prompt token ids, vLLM's parsed conversation, the template kwargs used."""

    token_ids: list[int]
    conversation: list[dict[str, Any]]
    chat_template_kwargs: dict[str, Any]


def _vllm_model_config(model: ModelConfig) -> Any:
    """vLLM's ModelConfig of ``model`` (the fields the engine would get that shape rendering and defaults)."""
    from vllm.config import ModelConfig as VLLMModelConfig

    fields = {f.name for f in dataclasses.fields(VLLMModelConfig)}
    args: dict[str, Any] = {"model": str(model.resolved_path()), "tokenizer": str(model.resolved_tokenizer()),
                            "dtype": model.dtype, "served_model_name": model.id}
    if model.max_model_len is not None:
        args["max_model_len"] = model.max_model_len
    args.update({k: v for k, v in model.engine_kwargs.items() if k in fields})
    return VLLMModelConfig(**args)


class Frontend:
    """Rendering, tokenization and sampling parameters of one model, configured as vLLM's CLI does."""

    def __init__(self, model: ModelConfig) -> None:
        from vllm.entrypoints.chat_utils import load_chat_template
        from vllm.parser import ParserManager
        from vllm.tokenizers import cached_tokenizer_from_config

        self.model_id = model.id
        self.client_errors = (*client_errors(), KeyError)  # how vLLM's pieces refuse a request's own input
        self.model_config = _vllm_model_config(model)
        self.tokenizer = cached_tokenizer_from_config(self.model_config)
        self.max_model_len = int(self.model_config.max_model_len)
        self.vocab_size = len(self.tokenizer)
        self.chat_template = load_chat_template(model.chat_template) if model.chat_template else None
        self.enable_auto_tools = model.enable_auto_tool_choice
        self.parser_cls = ParserManager.get_parser(
            tool_parser_name=model.tool_call_parser, reasoning_parser_name=model.reasoning_parser,
            enable_auto_tools=model.enable_auto_tool_choice, model_name=model.id,
            is_harmony=getattr(self.model_config.hf_config, "model_type", None) == "gpt_oss")
        self.default_sampling = self.model_config.get_diff_sampling_param()
        self._resolve_chat_template()

    def _resolve_chat_template(self) -> None:
        """Resolve the chat template's content format once, here: for it vLLM loads the model's processor from disk
        (once per process), which on the first chat request would hold the event loop, and every request queued
        behind it, for about half a second."""
        from vllm.renderers.hf import resolve_chat_template_content_format

        try:
            resolve_chat_template_content_format(chat_template=self.chat_template, tools=None, given_format="auto",
                                                 tokenizer=self.tokenizer, model_config=self.model_config)
        except Exception:
            logger.warning("model %s: its chat template could not be resolved", self.model_id, exc_info=True)

    @property
    def tool_parser_cls(self) -> Any:
        return self.parser_cls.tool_parser_cls if self.parser_cls is not None else None

    def _error(self, message: str, param: str | None = None) -> APIError:
        return APIError(400, message, param=param, model=self.model_id)

    # --- chat ---------------------------------------------------------------------------------
    def check_tools(self, req: Any) -> None:
        """Refuse tool choices this model cannot serve; constrain forced tool calls when no parser reads them."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.sampling_params import StructuredOutputsParams
        from vllm.tool_parsers.utils import get_json_schema_from_tools

        tool_choice = getattr(req, "tool_choice", "none")
        if not getattr(req, "tools", None) or tool_choice in (None, "none"):
            return
        if self.tool_parser_cls is not None:
            return  # the parser's adjust_request (in render_chat) does what its format needs
        if tool_choice == "auto":
            if not isinstance(req, ChatCompletionRequest):
                return
            raise self._error(f'"auto" tool choice needs enable_auto_tool_choice and tool_call_parser in the '
                              f"configuration of model {self.model_id}", param="tool_choice")
        try:
            schema = get_json_schema_from_tools(tool_choice=tool_choice, tools=req.tools)
        except self.client_errors as err:
            raise self._error(str(err), param="tool_choice") from None
        if schema is not None and isinstance(req, ChatCompletionRequest):
            req.structured_outputs = StructuredOutputsParams(json=schema)
            req.response_format = None

    def render_chat(self, req: Any) -> RenderedChat:
        """Prompt token ids of a chat request (ChatCompletionRequest or TokenizeChatRequest)."""
        from vllm.entrypoints.chat_utils import parse_chat_messages
        from vllm.renderers.hf import resolve_chat_template_content_format, safe_apply_chat_template

        if req.chat_template is not None or (req.chat_template_kwargs or {}).get("chat_template") is not None:
            raise self._error("a chat template in the request is not accepted by this server", param="chat_template")
        if not req.messages:
            raise self._error("messages must not be empty", param="messages")
        self._text_only(req.messages)
        self.check_tools(req)
        tools = [t.model_dump() for t in req.tools] if getattr(req, "tools", None) else None
        try:
            params = req.build_chat_params(self.chat_template, "auto").with_defaults({"tools": tools})
            fmt = resolve_chat_template_content_format(
                chat_template=params.chat_template, tools=tools, given_format="auto", tokenizer=self.tokenizer,
                model_config=self.model_config)
            conversation, mm_data, _ = parse_chat_messages(req.messages, self.model_config, content_format=fmt)
            if mm_data:
                raise self._error(f"model {self.model_id} takes text content only", param="messages")
            kwargs = params.get_apply_chat_template_kwargs()
            kwargs["tokenize"] = False
            text = safe_apply_chat_template(self.model_config, self.tokenizer, conversation, **kwargs)
        except APIError:
            raise
        except Exception as err:  # noqa: BLE001 - message parsing and template errors are the client's input
            raise self._error(f"cannot render the chat: {err}", param="messages") from None
        ids = self.tokenizer.encode(text, add_special_tokens=bool(req.add_special_tokens))
        self._adjust(req, params.chat_template_kwargs)
        return RenderedChat(ids, conversation, params.chat_template_kwargs)

    def _text_only(self, messages: list[Any]) -> None:
        """Refuse media parts before vLLM's message parser sees them (it would fetch their URLs)."""
        for k, msg in enumerate(messages):
            content = msg.get("content") if isinstance(msg, dict) else None
            if not isinstance(content, list):
                continue
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else "text" if isinstance(part, str) else None
                if kind not in _TEXT_PARTS:
                    raise self._error(f"content part type {kind!r} is not supported: model {self.model_id} takes "
                                      "text only", param=f"messages[{k}].content")

    def _adjust(self, req: Any, chat_template_kwargs: dict[str, Any]) -> None:
        """The parser's request adjustments (vLLM's OnlineRenderer.preprocess_chat does the same)."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        if self.parser_cls is None or not isinstance(req, ChatCompletionRequest):
            return
        if self.parser_cls.reasoning_parser_cls is None and req.tool_choice == "none":
            return
        try:
            self.parser(req.tools, chat_template_kwargs).adjust_request(request=req)
        except self.client_errors as err:
            raise self._error(str(err), param="tools") from None

    def parser(self, tools: Any, chat_template_kwargs: dict[str, Any] | None) -> Any:
        """A fresh parser (one per choice: parsers keep streaming state), or None when none is configured."""
        if self.parser_cls is None:
            return None
        return self.parser_cls(self.tokenizer, tools, model_config=self.model_config,
                               chat_template_kwargs=chat_template_kwargs)

    def chat_output(self, req: Any, rendered: RenderedChat, prompts: list[list[int]]) -> OutputSpec:
        """What a chat request asked of its output (parser, logprobs, echo)."""
        echo = None
        if req.echo:  # vLLM: the last message, when it has the role the answer continues
            last = rendered.conversation[-1] if rendered.conversation else {}
            role = "assistant" if req.add_generation_prompt else last.get("role")
            content = last.get("content") if last.get("role") == role else ""
            echo = [content if isinstance(content, str) else "\n".join(p.get("text", "") for p in content or [])]
        kwargs = rendered.chat_template_kwargs
        parser = (lambda: self.parser(req.tools, kwargs)) if self.parser_cls is not None else None
        return OutputSpec(chat=True, request=req, tokenizer=self.tokenizer, parser=parser,
                          auto_tools=self.enable_auto_tools, n=req.n or 1, prompt_ids=prompts, echo=echo,
                          top_logprobs=(req.top_logprobs or 0) if req.logprobs else None)

    @staticmethod
    def chat_size(req: Any) -> int:
        """Characters of a chat request's text and tools (decides inline or threaded rendering)."""
        size = 0
        for msg in req.messages:
            content = msg.get("content") if isinstance(msg, dict) else None
            if isinstance(content, str):
                size += len(content)
            elif isinstance(content, list):
                size += sum(len(str(p.get("text", ""))) if isinstance(p, dict) else len(str(p)) for p in content)
        return size + sum(len(json.dumps(t.model_dump())) for t in (getattr(req, "tools", None) or ()))

    # --- completions --------------------------------------------------------------------------
    def render_prompts(self, req: Any) -> list[list[int]]:
        """Token ids of each prompt of a completion request (CompletionRequest or TokenizeCompletionRequest)."""
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        if isinstance(req, CompletionRequest):
            if req.suffix is not None:
                raise self._error("suffix is not supported", param="suffix")
            if getattr(req, "prompt_embeds", None) is not None:
                raise self._error("prompt_embeds are not supported by this server", param="prompt_embeds")
        prompts = self.prompts(req)
        if not prompts:
            raise self._error("prompt must not be empty", param="prompt")
        out = []
        for p in prompts:
            if isinstance(p, str):
                out.append(self.tokenizer.encode(p, add_special_tokens=bool(req.add_special_tokens)))
            else:
                if max(p) >= self.vocab_size or min(p) < 0:
                    raise self._error(f"prompt token ids must be in [0, {self.vocab_size})", param="prompt")
                out.append(list(p))
        return out

    def completion_output(self, req: Any, raw: list[str | list[int]], prompts: list[list[int]]) -> OutputSpec:
        """What a completion request asked of its output (logprobs, echo)."""
        echo = None
        if req.echo:
            echo = [p if isinstance(p, str) else self.tokenizer.decode(ids)
                    for p, ids in zip(raw, prompts, strict=True)]
        return OutputSpec(chat=False, request=req, tokenizer=self.tokenizer, parser=None, auto_tools=False, n=req.n,
                          prompt_ids=prompts, echo=echo, top_logprobs=req.logprobs)

    @staticmethod
    def prompts(req: Any) -> list[str | list[int]]:
        """The prompt(s) as a list: one entry per prompt of a batch."""
        p = req.prompt
        if p is None:
            return []
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):  # validated as list[int] | list[list[int]] | list[str]: one kind throughout
            return [p]
        return list(p)

    # --- sampling -----------------------------------------------------------------------------
    def sampling(self, req: Any, max_tokens: int) -> Any:
        """vLLM's SamplingParams of the request (``to_sampling_params``), in delta output mode."""
        from vllm.sampling_params import RequestOutputKind

        if getattr(req, "use_beam_search", False):
            raise self._error("beam search is not supported by this server", param="use_beam_search")
        try:
            params = req.to_sampling_params(max_tokens, self.default_sampling)
        except self.client_errors as err:
            message = str(err.args[0]) if err.args else str(err)
            raise self._error(message, param=getattr(err, "parameter", None)) from None
        params.output_kind = RequestOutputKind.DELTA
        return params

    def default_max_tokens(self, budget: int) -> int:
        """max_tokens of a request that sets none: the generation config's, within the context left."""
        default = self.default_sampling.get("max_tokens")
        return min(budget, int(default)) if default else budget

    def reasoning_ended(self, parser: Any, prompt_ids: list[int], req: Any) -> bool | None:
        """vLLM's ``reasoning_ended`` engine hint (structured outputs start after the reasoning)."""
        if not getattr(req, "include_reasoning", True) or getattr(req, "_grammar_from_tool_parser", False):
            return True
        if parser is not None and getattr(parser, "reasoning_parser", None) is not None:
            return bool(parser.is_reasoning_end(prompt_ids))
        return None
