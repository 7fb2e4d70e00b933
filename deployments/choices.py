"""How one choice's output becomes OpenAI JSON: content, reasoning and tool calls, logprobs, echo.

Owns: ``OutputSpec`` (what a request asked of its output, built once per request by the ingress) and
``Choice`` (one choice's accumulated output; ``delta`` gives its streaming ``choices[]`` entry for a new
piece of output, ``final`` its non-streaming one). Tool calls and reasoning are read by vLLM's own
parsers (``Parser.parse`` / ``parse_delta``), forced tool calls without a parser by vLLM's
``extract_named_tool_call_streaming`` / ``extract_required_tool_call_streaming`` (streaming) and its
``FunctionDefinition`` list (whole output); messages and tool calls are vLLM's response models, dumped
once per choice. The plain content path (no parser, no tools, no logprobs) builds dicts only: it runs for
every streamed chunk. Logprobs follow vLLM's chat and completions formats.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from deployments.protocol import PositionLogprobs


def finish_reason(reason: str | None) -> str | None:
    if reason is None:
        return None
    return reason if reason in ("stop", "length") else "stop"


@dataclass(slots=True)
class OutputSpec:
    """What a request asked of its output.

    Attributes:
        chat: chat completions (else completions).
        request: vLLM's request model, as rendering adjusted it.
        tokenizer: the model's tokenizer (decodes logprob tokens vLLM left undecoded).
        parser: makes a fresh vLLM parser for a choice, or None when the model has none.
        auto_tools: the model's enable_auto_tool_choice.
        n: choices per prompt.
        prompt_ids: the prompts' token ids (reasoning parsers read them; echo with logprobs too).
        echo: the text to prepend to each prompt's choices (completions echo: the prompt; chat echo: the
            last message when it is the assistant's), or None.
        top_logprobs: how many alternatives per token, or None when no logprobs were asked for.
    """

    chat: bool
    request: Any
    tokenizer: Any
    parser: Any
    auto_tools: bool
    n: int
    prompt_ids: list[list[int]]
    echo: list[str] | None = None
    top_logprobs: int | None = None

    plain: bool = field(init=False)  # no parser, tools, logprobs or echo: content goes out as it comes
    forced_tool: bool = field(init=False)  # tool_choice required or named: the output is the tool call's JSON
    named_tool: str | None = field(init=False)  # the function of a named tool_choice

    def __post_init__(self) -> None:
        choice = getattr(self.request, "tool_choice", None) if self.chat else None
        tools = bool(getattr(self.request, "tools", None))
        self.named_tool = choice.function.name if tools and choice is not None and not isinstance(choice, str) else None
        self.forced_tool = tools and (choice == "required" or self.named_tool is not None)
        self.plain = (self.parser is None and self.top_logprobs is None and self.echo is None
                      and not self.forced_tool)


class Choice:
    """One choice: accumulates its output and renders it (streaming deltas, or the final object)."""

    __slots__ = ("_echoed", "_name_sent", "_parser", "_prompt_ids", "_spec", "_text_offset", "_tools_streamed",
                 "echo", "finish", "index", "logprobs", "texts", "token_ids")

    def __init__(self, spec: OutputSpec, index: int) -> None:
        self._spec, self.index = spec, index
        self._prompt_ids = spec.prompt_ids[index // spec.n] if spec.prompt_ids else []
        self.echo = spec.echo[index // spec.n] if spec.echo else ""
        self._parser = spec.parser() if spec.parser is not None else None
        self.texts: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[PositionLogprobs] = []
        self.finish: str | None = None
        self._echoed = False
        self._name_sent = False
        self._tools_streamed = False
        self._text_offset = 0

    def add(self, text: str, ids: list[int], logprobs: list[PositionLogprobs] | None, finish: str | None) -> None:
        self.texts.append(text)
        self.token_ids.extend(ids)
        if logprobs:
            self.logprobs.extend(logprobs)
        if finish is not None:
            self.finish = finish

    # --- streaming ----------------------------------------------------------------------------
    def delta(self, text: str, ids: list[int], logprobs: list[PositionLogprobs] | None, finish: str | None,
              prompt_logprobs: list[PositionLogprobs] | None = None) -> dict[str, Any] | None:
        """The streaming ``choices[]`` entry of a new piece of output (None: nothing to send yet)."""
        spec = self._spec
        previous = "".join(self.texts) if spec.forced_tool and spec.named_tool is None else ""
        self.add(text, ids, logprobs, finish)
        if spec.chat:
            return self._chat_delta(previous, text, ids, logprobs, finish)
        echo_text, echo_ids, echo_lps = "", [], []
        if not self._echoed:
            self._echoed = True
            if spec.echo is not None:
                echo_text, echo_ids, echo_lps = self.echo, self._prompt_ids, list(prompt_logprobs or [])
        lp = None
        if spec.top_logprobs is not None:
            lp = self._completion_logprobs(echo_ids + list(ids), echo_lps + list(logprobs or []), self._text_offset)
            self._text_offset += sum(len(t) for t in lp["tokens"])
        return {"index": self.index, "text": echo_text + text, "logprobs": lp, "finish_reason": finish_reason(finish)}

    def _chat_delta(self, previous: str, text: str, ids: list[int], logprobs: list[PositionLogprobs] | None,
                    finish: str | None) -> dict[str, Any] | None:
        spec = self._spec
        delta: dict[str, Any] | None
        if self._parser is not None:
            msg = self._parser.parse_delta(delta_text=text, delta_token_ids=list(ids), request=spec.request,
                                           prompt_token_ids=self._prompt_ids, finished=finish is not None)
            delta = _dump_delta(msg)
        elif spec.forced_tool:
            delta = self._forced_tool_delta(previous, text)
        else:
            delta = {"content": text} if text else {}
        if delta is not None and delta.get("tool_calls"):
            self._tools_streamed = True
        if spec.echo is not None and not self._echoed:
            self._echoed = True
            if self.echo:
                delta = delta if delta is not None else {}
                delta["content"] = self.echo + (delta.get("content") or "")
        if delta is None:
            if finish is None:
                return None
            delta = {}
        lp = None
        if spec.top_logprobs is not None and not (self._parser is not None and not spec.request.include_reasoning):
            lp = self._chat_logprobs(ids, logprobs or [])
        reason = finish_reason(finish)
        if reason is not None and self._tools_streamed and spec.named_tool is None:
            reason = "tool_calls"
        return {"index": self.index, "delta": delta, "logprobs": lp, "finish_reason": reason}

    def _forced_tool_delta(self, previous: str, text: str) -> dict[str, Any] | None:
        from vllm.tool_parsers.streaming import extract_named_tool_call_streaming, extract_required_tool_call_streaming

        spec = self._spec
        name = spec.named_tool
        if name is not None:
            if not text:
                return None
            msg, self._name_sent = extract_named_tool_call_streaming(
                delta_text=text, function_name=name, function_name_returned=self._name_sent, tool_call_idx=None,
                tool_call_id_type="random", tokenizer=spec.tokenizer)
        else:
            msg, self._name_sent = extract_required_tool_call_streaming(
                previous_text=previous, current_text=previous + text, delta_text=text,
                function_name_returned=self._name_sent, tool_call_idx=None, tool_call_id_type="random")
        return _dump_delta(msg)

    # --- whole output -------------------------------------------------------------------------
    def final(self, prompt_logprobs: list[PositionLogprobs] | None = None) -> dict[str, Any]:
        """The non-streaming ``choices[]`` entry."""
        spec = self._spec
        text = "".join(self.texts)
        if not spec.chat:
            ids, lps = list(self.token_ids), list(self.logprobs)
            if spec.echo is not None:
                text = self.echo + text
                ids, lps = list(self._prompt_ids) + ids, list(prompt_logprobs or []) + lps
            lp = self._completion_logprobs(ids, lps, 0) if spec.top_logprobs is not None else None
            reason = finish_reason(self.finish) or "stop"
            return {"index": self.index, "text": text, "logprobs": lp, "finish_reason": reason}
        reason = finish_reason(self.finish) or "stop"
        lp = self._chat_logprobs(self.token_ids, self.logprobs) if spec.top_logprobs is not None else None
        if spec.plain:
            message = {"role": "assistant", "content": text}
            return {"index": self.index, "message": message, "logprobs": lp, "finish_reason": reason}
        message, tools_called = self._chat_message(text)
        if spec.echo is not None and message.get("content") is not None:
            message["content"] = self.echo + message["content"]
        if self._parser is not None and not spec.request.include_reasoning:
            lp = None
        if tools_called and spec.named_tool is None and (spec.request.tool_choice != "required" or reason == "stop"):
            reason = "tool_calls"
        return {"index": self.index, "message": message, "logprobs": lp, "finish_reason": reason}

    def _chat_message(self, text: str) -> tuple[dict[str, Any], bool]:
        """vLLM's ChatMessage of the whole output (reasoning, content, tool calls), and whether tools were called."""
        from vllm.entrypoints.chat_utils import make_tool_call_id
        from vllm.entrypoints.openai.chat_completion.protocol import ChatMessage
        from vllm.entrypoints.openai.engine.protocol import ToolCall

        spec, req = self._spec, self._spec.request
        reasoning, content, calls = None, text, []
        if self._parser is not None:
            reasoning, content, calls = self._parser.parse(text, req, enable_auto_tools=spec.auto_tools,
                                                           model_output_token_ids=self.token_ids)
            calls = calls or []
            if not req.include_reasoning:
                reasoning = None
        elif spec.forced_tool:
            calls, content = _forced_tool_calls(text, spec.named_tool), None
        tool_calls = [ToolCall(id=c.id or make_tool_call_id(), function=c) for c in calls]
        if spec.forced_tool and content is None:
            content = ""
        if tool_calls and getattr(req, "parallel_tool_calls", True) is False:
            tool_calls = tool_calls[:1]
        message = ChatMessage(role="assistant", reasoning=reasoning, content=content, tool_calls=tool_calls)
        return message.model_dump(mode="json"), bool(tool_calls)

    # --- logprobs -----------------------------------------------------------------------------
    def _token(self, tid: int, decoded: str | None) -> str:
        return decoded if decoded is not None else self._spec.tokenizer.decode([tid])

    def _chat_logprobs(self, ids: list[int], positions: list[PositionLogprobs]) -> dict[str, Any]:
        top = self._spec.top_logprobs or 0
        content = []
        for k, tid in enumerate(ids):
            pos = positions[k] if k < len(positions) else None
            chosen = next((c for c in pos if c[0] == tid), None) if pos else None
            if chosen is None:
                token = self._token(tid, None)
                content.append({"token": token, "logprob": -9999.0, "bytes": list(token.encode("utf-8", "replace")),
                                "top_logprobs": []})
                continue
            token = self._token(tid, chosen[2])
            alts = []
            for j, (alt_id, alt_lp, alt_dec) in enumerate(pos):
                if top == -1 or j < top:
                    alt = self._token(alt_id, alt_dec)
                    alts.append({"token": alt, "logprob": max(alt_lp, -9999.0),
                                 "bytes": list(alt.encode("utf-8", "replace"))})
            content.append({"token": token, "logprob": max(chosen[1], -9999.0),
                            "bytes": None if chosen[2] is None else list(chosen[2].encode("utf-8", "replace")),
                            "top_logprobs": alts})
        return {"content": content}

    def _completion_logprobs(self, ids: list[int], positions: list[PositionLogprobs], offset: int) -> dict[str, Any]:
        top = self._spec.top_logprobs or 0
        tokens, token_lps, tops, offsets = [], [], [], []
        for k, tid in enumerate(ids):
            pos = positions[k] if k < len(positions) else None
            chosen = next((c for c in pos if c[0] == tid), None) if pos else None
            if chosen is None:
                token = self._token(tid, None)
                tokens.append(token)
                token_lps.append(None)
                tops.append(None)
            else:
                token = self._token(tid, chosen[2])
                tokens.append(token)
                token_lps.append(max(chosen[1], -9999.0))
                alts: dict[str, float] = {}
                for j, (alt_id, alt_lp, alt_dec) in enumerate(pos):
                    if top >= j:  # OpenAI: the top `logprobs` alternatives, plus the chosen token
                        alts[self._token(alt_id, alt_dec)] = max(alt_lp, -9999.0)
                tops.append(alts)
            offsets.append(offset)
            offset += len(token)
        return {"text_offset": offsets, "token_logprobs": token_lps, "tokens": tokens, "top_logprobs": tops}


def _dump_delta(msg: Any) -> dict[str, Any] | None:
    if msg is None:
        return None
    out = msg.model_dump(mode="json", exclude_none=True)
    if not out.get("tool_calls"):
        out.pop("tool_calls", None)
    return out


def _forced_tool_calls(text: str, name: str | None) -> list[Any]:
    """Tool calls of an output constrained to the tools' JSON schema (no parser configured)."""
    from pydantic import TypeAdapter, ValidationError
    from vllm.entrypoints.openai.engine.protocol import FunctionCall, FunctionDefinition

    if name is not None:
        return [FunctionCall(name=name, arguments=text)] if text.strip() else []
    try:
        calls = TypeAdapter(list[FunctionDefinition]).validate_json(text)
    except ValidationError:
        return []
    return [FunctionCall(name=c.name, arguments=json.dumps(c.parameters, ensure_ascii=False)) for c in calls]
