from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from nv_engine.config import Config
from nv_engine.core.output_processor import OutputProcessor
from nv_engine.core.scheduler import Scheduler
from nv_engine.core.sequence import Sequence
from nv_engine.engine.inputs import (
    Prompt,
    bad_words_token_ids,
    chat_prompt_ids,
    prompt_text,
    prompt_token_ids,
)
from nv_engine.engine.model_files import (
    collect_eos_token_ids,
    load_generation_config,
    load_tokenizer,
    sampling_defaults,
)
from nv_engine.outputs import RequestOutput
from nv_engine.sampling_params import SamplingParams, check_for_model, expand_n
from nv_engine.worker.external_workers import ExternalWorkers
from nv_engine.worker.model_runner import ModelRunner
from nv_engine.worker.profiler import PROFILER_DIR_ENV, ProfileCommand
from nv_engine.worker.tp_workers import WorkerError, WorkerPool

logger = logging.getLogger(__name__)

_SEED_MASK = (1 << 63) - 1
_DRAIN_AFTER_ABORT_S = 10.0  # after a worker died: how long close() waits for the device


class LLMEngine:
    """The engine behind `LLM`: tokenizer, scheduler, rank-0 model runner, TP workers.

    Streaming use: `add_request()` then `step()` until `is_finished()`; each `step()` returns a
    `RequestOutput` for every request that produced a token in it (with `stream=False`, only
    once the request finishes). `generate()` does all of that for a batch. `close()` (or a
    `with` block) stops the workers and frees the GPU memory.
    """

    def __init__(self, model: str | Path | Config, **kwargs: Any) -> None:
        """`model`: a model directory, with Config's fields as keywords; or a Config."""
        self.config = config = Config.of(model, **kwargs)
        self.tokenizer = load_tokenizer(config)
        self._workers: WorkerPool | ExternalWorkers | None = None
        try:
            tp = None
            if config.tensor_parallel_size > 1:
                external = config.distributed_executor_backend == "external"
                self._workers = ExternalWorkers(config) if external else WorkerPool(config)
                tp = self._workers.start()
            self.model_runner = (
                ModelRunner(config, 0, tp) if tp is not None else ModelRunner(config)
            )
            if self._workers is not None:
                self._workers.ready()  # a worker's death is now the step's to report
        except BaseException as e:
            # a collective that failed (torch raises RuntimeErrors) may have failed because a
            # worker died: then the death is the cause. A ValueError or TypeError is rank 0's
            # own (a setting, a checkpoint), though the workers failed on it too.
            failed_elsewhere = isinstance(e, RuntimeError) and not isinstance(e, WorkerError)
            dead = self._dead_worker() if failed_elsewhere else None
            self.close()
            if dead is not None:  # name the rank that died, not the collective that failed
                raise dead from e
            raise
        num_blocks = self.model_runner.num_blocks
        capacity = num_blocks * config.kvcache_block_size
        if capacity < config.max_model_len:
            logger.warning(
                "KV cache holds %d tokens: max_model_len lowered from %d",
                capacity,
                config.max_model_len,
            )
            config = self.config = dataclasses.replace(config, max_model_len=capacity)
        generation = load_generation_config(config)
        self.default_sampling = sampling_defaults(generation)
        eos_token_ids = collect_eos_token_ids(config, generation, self.tokenizer)
        self.scheduler = Scheduler(config, num_blocks, eos_token_ids)
        self.output_processor = OutputProcessor(
            self.tokenizer, eos_token_ids, config.max_model_len, self.scheduler.finish
        )
        self._seed_rng = random.Random(config.seed)
        self.last_step: tuple[bool, int] = (False, 0)  # (was prefill, tokens computed)
        # async_scheduling: the step queued on the device, postprocessed by the next step()
        self._in_flight: tuple[Any, Any] | None = None

    # ---- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Free this process's model, KV cache and CUDA graphs, then stop the workers (which
        free theirs first too: NCCL's teardown waits while graphs that captured its collectives
        live). Idempotent; the engine cannot be used afterwards."""
        runner, self.model_runner = getattr(self, "model_runner", None), None
        workers, self._workers = getattr(self, "_workers", None), None
        drain_timeout_s = None
        if workers is not None and not workers.all_alive():
            workers.close()  # abort the group first: it unblocks a collective stuck on the dead
            workers, drain_timeout_s = None, _DRAIN_AFTER_ABORT_S
        if runner is not None:
            if drain_timeout_s is None:
                runner.close()
            else:
                try:
                    runner.close(drain_timeout_s)
                except RuntimeError:
                    # the aborted collectives can leave the device in an error state; the
                    # worker's death was reported already, and this close must complete
                    logger.warning("freeing rank 0 after a worker's death failed", exc_info=True)
        if workers is not None:
            workers.close()

    # ---- profiling -----------------------------------------------------------------------------

    def start_profile(self, directory: str | Path | None = None) -> None:
        """Start torch.profiler on every rank (vLLM's API). `stop_profile()` writes one Chrome
        trace per rank into `directory`, by default the one $NV_TORCH_PROFILER_DIR names."""
        directory = str(directory or os.environ.get(PROFILER_DIR_ENV) or "")
        if not directory:
            raise RuntimeError(f"set {PROFILER_DIR_ENV} to the directory for the traces")
        self._profile(ProfileCommand(start=True, directory=directory))

    def stop_profile(self) -> None:
        """Stop the profilers that `start_profile()` started and write their traces."""
        self._profile(ProfileCommand(start=False, directory=""))

    def _profile(self, command: ProfileCommand) -> None:
        runner = self.model_runner
        if runner is None:
            raise RuntimeError("the engine is closed")
        if runner.profiler.active == command.start:
            state = "already running" if command.start else "not running"
            raise RuntimeError(f"the profiler is {state}")
        runner.profiler.apply(command)  # first: a directory it cannot write stops it here
        if self._workers is not None:
            self._workers.send(command)  # the workers apply it between two steps, as rank 0

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def get_tokenizer(self) -> Any:
        """The model's tokenizer (vLLM's): a transformers tokenizer, or None without one."""
        return self.tokenizer

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (vLLM's), e.g. between benchmark runs; False, and nothing
        forgotten, while a request holds KV blocks or a step is still in flight."""
        if self._in_flight is not None:
            return False
        return self.scheduler.block_manager.reset_prefix_cache()

    def get_default_sampling_params(self) -> SamplingParams:
        """What requests given no sampling_params use (vLLM's): SamplingParams' defaults, with
        the model's generation_config.json setting temperature, top_k, top_p, min_p,
        repetition_penalty and max_tokens (its max_new_tokens) where it gives them."""
        return SamplingParams(**self.default_sampling)

    # ---- requests ------------------------------------------------------------------------------

    def prompt_token_ids(self, prompt: Prompt, index: int | None = None) -> list[int]:
        """A prompt's token ids, validated (ids in the vocabulary, the length schedulable);
        `index` names it in errors as prompts[index]."""
        where = "prompt" if index is None else f"prompts[{index}]"
        token_ids = prompt_token_ids(
            prompt, self.tokenizer, self.config.hf_config.vocab_size, where
        )
        self.scheduler.check_prompt(len(token_ids))
        return token_ids

    def add_request(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None, stream: bool = True
    ) -> int:
        """Queue one request; returns its id. Raises ValueError/TypeError (and queues nothing)
        for a bad prompt or parameters. `stream`: `step()` returns its output after every step
        that adds a token (else only the final one)."""
        params = self.checked_params(sampling_params)
        if params.n != 1:
            raise ValueError(f"add_request takes n=1 (got n={params.n}); generate() takes n > 1")
        return self._add(self.prompt_token_ids(prompt), params, stream)

    def checked_params(self, params: SamplingParams | None) -> SamplingParams:
        """`params`, or the model's defaults for None; a TypeError for another type, a ValueError
        for what the model bounds (logprobs, token ids: `check_for_model`)."""
        if params is None:
            return SamplingParams(**self.default_sampling)
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        check_for_model(params, self.config.max_logprobs, self.config.hf_config.vocab_size)
        if params.bad_words and self.tokenizer is None:
            raise ValueError("bad_words needs a tokenizer; this model has none")
        return params

    def _add(self, token_ids: list[int], params: SamplingParams, stream: bool) -> int:
        if params.max_tokens is None:  # vLLM's: as many as the model's length leaves
            room = max(1, self.scheduler.max_model_len - len(token_ids))
            params = dataclasses.replace(params, max_tokens=room)
        seed = (
            params.seed & _SEED_MASK if params.seed is not None else self._seed_rng.getrandbits(63)
        )
        seq = Sequence(token_ids, params, seed)
        if params.bad_words:
            seq.bad_words_ids = bad_words_token_ids(self.tokenizer, params.bad_words)
        self.scheduler.add(seq)
        self.output_processor.add(seq, stream)
        return seq.seq_id

    def abort_request(self, request_id: int) -> RequestOutput | None:
        """End an unfinished request and free its blocks; unknown or finished ids are ignored.
        Returns the final output (finish_reason "abort") of a streaming request."""
        seq = self.scheduler.seqs.get(request_id)
        if seq is None:
            return None
        self.scheduler.finish(seq, "abort")
        return self.output_processor.abort(seq)

    def is_finished(self) -> bool:
        return self.scheduler.is_finished() and self._in_flight is None

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.scheduler.seqs)

    def _dead_worker(self) -> WorkerError | None:
        """After start-up failed: the WorkerError of a worker that died meanwhile, if one did."""
        if not isinstance(self._workers, WorkerPool):
            return None
        try:
            self._workers.wait_for_failure(grace_s=1.0)
        except WorkerError as e:
            return e
        return None

    def check_health(self) -> None:
        """Raise if a tensor-parallel worker has died (WorkerError names the rank)."""
        if self._workers is not None:
            self._workers.check_alive()

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; returns the outputs it produced (see the class docstring).
        With async_scheduling, the step scheduled here is only queued on the device, and the
        outputs are those of the step before it."""
        if self.model_runner is None:
            raise RuntimeError("the engine is closed")
        plan = self.scheduler.schedule()
        launched = None
        if plan is not None:
            if self._workers is not None:
                self._workers.send(plan)
            launched = (plan, self._run(self.model_runner.launch, plan))
            self.last_step = (plan.is_prefill, plan.num_tokens)
        if self.config.async_scheduling:
            done, self._in_flight = self._in_flight, launched
        else:
            done = launched
        if done is None:
            return []
        plan, sampled = done
        if sampled is not None and self._workers is not None:
            self._run(sampled.wait, self._workers.poll)
        tokens = self._run(sampled.tolist) if sampled is not None else []
        logprobs = prompt_logprobs = None
        if sampled is not None:
            logprobs, prompt_logprobs = sampled.logprobs(), sampled.prompt_logprobs()
        updated = self.scheduler.postprocess(plan, tokens, logprobs, prompt_logprobs)
        return self.output_processor.process(updated)

    def _run(self, fn, *args):
        try:
            return fn(*args)
        except Exception:
            self._in_flight = None
            if self._workers is not None:
                self._workers.wait_for_failure()  # name the dead worker rather than gloo/NCCL
            raise

    # ---- batch API -----------------------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[dict[str, Any]]:
        """Generate for every prompt; returns one dict per prompt, in input order, with `text`,
        `token_ids` (output tokens), `finish_reason` ("stop" or "length"), `prompt_token_ids`,
        `num_cached_tokens`, and `logprobs` (per output token, {token id: logprob}) and
        `cumulative_logprob` where SamplingParams.logprobs asked for them, else None; and
        `outputs`, a list of the n completions (SamplingParams.n), each with those fields;
        `prompt_logprobs` (None for the first prompt token) where asked for.
        A prompt is text, token ids (a list, or a 1-D numpy array or tensor), or vLLM's
        {"prompt": text} / {"prompt_token_ids": ids}. Every prompt is validated before any is
        queued."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(sampling_params, SamplingParams) or sampling_params is None:
            sampling_params = [sampling_params] * len(prompts)
        elif not isinstance(sampling_params, (list, tuple)):
            raise TypeError(
                "sampling_params must be SamplingParams or a list of them, "
                f"got {type(sampling_params).__name__}"
            )
        sampling_params = list(sampling_params)
        if len(sampling_params) != len(prompts):
            raise ValueError(
                f"got {len(prompts)} prompts but {len(sampling_params)} sampling_params"
            )
        token_ids = [self.prompt_token_ids(p, i) for i, p in enumerate(prompts)]
        sampling_params = [self.checked_params(p) for p in sampling_params]
        ids: list[int] = []
        groups: list[list[int]] = []  # the request ids of each prompt's n completions
        outputs: dict[int, RequestOutput] = {}
        try:
            for t, p in zip(token_ids, sampling_params, strict=True):
                groups.append([self._add(t, child, stream=False) for child in expand_n(p)])
                ids += groups[-1]
            pending = set(ids)
            bar = tqdm(total=len(ids), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
            prefill_tps = decode_tps = 0.0
            while pending:
                t0 = time.perf_counter()
                done = self.step()
                dt = time.perf_counter() - t0
                if not done and self.is_finished():
                    raise RuntimeError("scheduler idle with requests pending")
                is_prefill, num_tokens = self.last_step
                if is_prefill:
                    prefill_tps = num_tokens / dt
                else:
                    decode_tps = num_tokens / dt
                bar.set_postfix(prefill=f"{prefill_tps:.0f}tok/s", decode=f"{decode_tps:.0f}tok/s")
                for out in done:
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        outputs[out.request_id] = out
                        bar.update(1)
            if self.scheduler.is_finished():
                # a step queued after the last request finished (overlapped scheduling) holds
                # only discarded tokens: collect it, so the engine is idle when we return
                while self._in_flight is not None:
                    self.step()
            bar.close()
        finally:
            for rid in ids:
                if rid not in outputs:
                    self.abort_request(rid)
        results = []
        for prompt, group in zip(prompts, groups, strict=True):
            out = merge_n([outputs[rid] for rid in group])
            out.prompt = prompt_text(prompt)
            results.append(out.to_dict())
        return results

    def chat(
        self,
        messages: list[dict[str, Any]] | Seq[list[dict[str, Any]]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        continue_final_message: bool = False,
    ) -> list[dict[str, Any]]:
        """vLLM's `LLM.chat`: one conversation (a list of {"role": ..., "content": ...} dicts) or
        a list of them, each rendered with the tokenizer's chat template and generated from
        (`chat_template_kwargs` go to the template, e.g. {"enable_thinking": False} for Qwen3;
        `continue_final_message` with `add_generation_prompt=False` continues the last
        message). Returns what `generate` returns, one dict per conversation."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise TypeError("messages must be a conversation (a list of dicts) or a list of them")
        single = isinstance(messages[0], dict)
        conversations = [messages] if single else list(messages)
        prompts = [
            {
                "prompt_token_ids": self.chat_prompt_ids(
                    conv,
                    add_generation_prompt,
                    chat_template_kwargs,
                    where="messages" if single else f"messages[{i}]",
                    continue_final_message=continue_final_message,
                )
            }
            for i, conv in enumerate(conversations)
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def chat_prompt_ids(
        self,
        conversation: Seq[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        where: str = "messages",
        continue_final_message: bool = False,
    ) -> list[int]:
        """One conversation rendered with the tokenizer's chat template, as token ids."""
        return chat_prompt_ids(
            self.tokenizer, conversation, add_generation_prompt, chat_template_kwargs, where,
            continue_final_message,
        )  # fmt: skip


def merge_n(outs: list[RequestOutput]) -> RequestOutput:
    """One prompt's n completions (each its own request) as one RequestOutput, completion i at
    index i (vLLM's RequestOutput.outputs)."""
    if len(outs) == 1:
        return outs[0]
    completions = [o.outputs[0] for o in outs]
    for i, c in enumerate(completions):
        c.index = i
    first = outs[0]
    return RequestOutput(
        request_id=first.request_id,
        prompt_token_ids=first.prompt_token_ids,
        outputs=completions,
        finished=all(o.finished for o in outs),
        num_cached_tokens=first.num_cached_tokens,
        prompt_logprobs=first.prompt_logprobs,
        prompt=first.prompt,
    )
