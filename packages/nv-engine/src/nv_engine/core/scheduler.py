from __future__ import annotations

from collections import deque

from nv_engine.config import Config
from nv_engine.core.plan import (
    PenaltyInputs,
    PromptLogprobsInputs,
    ScheduledSeq,
    StepPlan,
    TokenLogprobs,
)
from nv_engine.core.sequence import PENDING, Sequence, SequenceStatus
from nv_engine.engine.inputs import check_prompt_length
from nv_kvcache import BlockManager


class Scheduler:
    """Continuous batching over nv-kvcache's BlockManager (no block bookkeeping of its own).

    Each step is either a prefill step (partly prefilled prompts first, then newly admitted
    ones, chunked to fit `max_num_batched_tokens`) or a decode step (one token for every running
    sequence). When decode runs out of KV blocks, the most recently admitted running sequence is
    preempted: its blocks are freed and it is recomputed later (usually from the prefix cache).

    A step's plan is final when `schedule()` returns it: the sequences' progress moves on then,
    and every token to be sampled gets a `PENDING` slot. `postprocess()` fills those slots in;
    the output stage (OutputProcessor) decides which sequences stop and calls `finish()`. The
    engine may schedule step t+1 before step t's postprocess (overlapped scheduling); a stop is
    then learnt one step late, and the extra token is dropped.
    """

    def __init__(self, config: Config, num_blocks: int, eos_token_ids: set[int]) -> None:
        # eos_token_ids: banned from sampling before min_tokens
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len
        self.mix_decode_and_prefill = config.mix_decode_and_prefill
        self.eos_token_ids = eos_token_ids
        self.block_manager = BlockManager(
            num_blocks, config.kvcache_block_size, config.enable_prefix_caching
        )
        self.seqs: dict[int, Sequence] = {}  # every unfinished sequence, by id
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0
        self._has_extras = False

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def check_prompt(self, num_tokens: int) -> None:
        """Reject, before anything is allocated, a prompt that can never be scheduled."""
        bm = self.block_manager
        check_prompt_length(num_tokens, self.max_model_len, bm.num_blocks * bm.block_size)

    def add(self, seq: Sequence) -> None:
        self.check_prompt(len(seq))
        p = seq.params
        if p.min_tokens:
            seq.min_tokens_banned = tuple(
                sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids))
            )
        self.seqs[seq.seq_id] = seq
        self.waiting.append(seq)

    # ---- scheduling ----------------------------------------------------------------------------

    def schedule(self) -> StepPlan | None:
        """The next step's plan, or None when there is nothing to run. Without
        mix_decode_and_prefill: prefill chunks if any prompt has tokens left, else one decode
        token per running request. With it: the decode tokens first, then prefill chunks in
        what is left of the budget (a step with any prefill row runs as a prefill step)."""
        self._has_extras = False  # set by _scheduled for a row with per-request logits work
        if self.mix_decode_and_prefill:
            decode = self._decode_rows()
            prefill = self._prefill_rows(self.max_num_batched_tokens - len(decode))
            rows, is_prefill = decode + prefill, bool(prefill)
        else:
            rows = self._prefill_rows(self.max_num_batched_tokens)
            is_prefill = bool(rows)
            if not rows:
                rows = self._decode_rows()
        return StepPlan(is_prefill, tuple(rows), self._has_extras) if rows else None

    def _prefill_rows(self, budget: int) -> list[ScheduledSeq]:
        scheduled: list[ScheduledSeq] = []
        # Prompts already admitted but not fully computed (chunked prefill) go first.
        for seq in self.running:
            if budget == 0:
                break
            if seq.num_computed_tokens < seq.num_prefill_tokens:
                scheduled.append(self._prefill_chunk(seq, budget))
                budget -= len(scheduled[-1].token_ids)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = self.block_manager.allocate(
                seq.seq_id,
                seq.token_ids,
                seq.params.cache_salt,
                read_cache=seq.params.prompt_logprobs is None,  # those need every prompt token
                keep_tokens=False,  # the Sequence owns its tokens
            )
            if cached is None:
                break  # the pool is full; running sequences will free blocks
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.num_computed_tokens = seq.num_cached_tokens = cached
            seq.num_prefill_tokens = len(seq)
            self.running.append(seq)
            scheduled.append(self._prefill_chunk(seq, budget))
            budget -= len(scheduled[-1].token_ids)
        # Prompt tokens are all known: publish their blocks for prefix hits by later steps (which
        # run after this one on the device); not earlier, or this step could hit its own blocks.
        for s in scheduled:
            seq = self.seqs[s.seq_id]
            self.block_manager.mark_computed(
                s.seq_id, s.start_pos + len(s.token_ids), seq.token_ids
            )
        return scheduled

    def _prefill_chunk(self, seq: Sequence, budget: int) -> ScheduledSeq:
        start = seq.num_computed_tokens
        end = min(seq.num_prefill_tokens, start + budget)
        return self._scheduled(seq, seq.token_ids[start:end], start, end == seq.num_prefill_tokens)

    def _decode_rows(self) -> list[ScheduledSeq]:
        """One token for every running request whose prompt is computed; requests are
        preempted, latest admitted first, while the KV cache has no slot for one."""
        scheduled: list[ScheduledSeq] = []
        bm = self.block_manager
        running = self.running
        i = 0
        while i < len(running):
            seq = running[i]
            if self._is_done(seq, len(seq)) or seq.num_computed_tokens < seq.num_prefill_tokens:
                i += 1  # its last token is still being sampled, or its prompt is not computed
                continue
            # The token sampled last step needs a KV slot before it can be computed.
            while not bm.append_slots(seq.seq_id):
                victim = running.pop()  # most recently admitted
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                scheduled.append(self._scheduled(seq, seq.token_ids[-1:], len(seq) - 1, True))
                i += 1
        return scheduled

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq.seq_id)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _scheduled(
        self, seq: Sequence, token_ids: list[int], start: int, sample: bool
    ) -> ScheduledSeq:
        """The plan's row for `seq`; the sequence's progress moves on now, and a token to be
        sampled gets its PENDING slot."""
        num_out = seq.num_output_tokens
        table = tuple(self.block_manager.block_table(seq.seq_id))  # a copy: the plan is final
        row = ScheduledSeq(seq.seq_id, token_ids, start, table, sample, *seq.sampling, num_out)
        if seq.has_extras:  # the per-step work of rarer parameters, only where they are set
            self._has_extras = True
            p = seq.params
            banned = seq.min_tokens_banned if num_out < p.min_tokens else ()
            conditional: tuple[tuple[int, int], ...] = ()
            if sample and seq.bad_words_ids:
                words, conditional = self._bad_word_bans(seq)
                banned = tuple(banned) + words
            row = row._replace(
                banned_token_ids=banned,
                logprobs=p.logprobs,
                params=p if p.logit_bias or p.allowed_token_ids else None,
                conditional_bans=conditional,
                penalties=self._penalty_inputs(seq) if sample and p.has_penalties else None,
                prompt_logprobs=self._prompt_logprobs_inputs(seq, start, start + len(token_ids)),
            )
        seq.num_computed_tokens = start + len(token_ids)
        if sample:
            seq.token_ids.append(PENDING)
        return row

    @staticmethod
    def _bad_word_bans(seq: Sequence) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
        """The bad words' last tokens to ban in the step that samples seq's next token: those
        whose other tokens end the output. When the output's last token is still being
        sampled, the match on it is left to the device: (that token, the token to ban)."""
        out = seq.token_ids[seq.num_prompt_tokens :]
        pending = bool(out) and out[-1] == PENDING
        known = out[:-1] if pending else out
        banned: list[int] = []
        conditional: list[tuple[int, int]] = []
        for word in seq.bad_words_ids:
            *prefix, last = word
            if not prefix:
                banned.append(last)
            elif pending:
                head, tail = prefix[:-1], prefix[-1]
                if len(known) >= len(head) and (not head or known[-len(head) :] == head):
                    conditional.append((tail, last))
            elif len(known) >= len(prefix) and known[-len(prefix) :] == prefix:
                banned.append(last)
        return tuple(banned), tuple(conditional)

    @staticmethod
    def _penalty_inputs(seq: Sequence) -> PenaltyInputs:
        p = seq.params
        if seq.prompt_ids is None:
            seq.prompt_ids = tuple(seq.token_ids[: seq.num_prompt_tokens])
        return PenaltyInputs(
            p.repetition_penalty,
            p.frequency_penalty,
            p.presence_penalty,
            seq.prompt_ids,
            tuple(seq.output_token_ids),
        )

    @staticmethod
    def _prompt_logprobs_inputs(seq: Sequence, start: int, end: int) -> PromptLogprobsInputs | None:
        """For a chunk [start, end) of a request with prompt_logprobs still to collect: the
        prompt tokens its positions predict (position p predicts token p + 1)."""
        done = seq.prompt_logprobs
        if done is None or len(done) == seq.num_prompt_tokens:  # (all collected: a recompute)
            return None
        last = min(end, seq.num_prompt_tokens - 1)  # the last position with a prompt target
        if last <= start:
            return None
        targets = tuple(seq.token_ids[start + 1 : last + 1])
        return PromptLogprobsInputs(seq.params.prompt_logprobs, targets)

    # ---- after the step --------------------------------------------------------------------------

    def postprocess(
        self,
        plan: StepPlan,
        sampled: list[int],
        logprobs: TokenLogprobs | None = None,
        prompt_logprobs: TokenLogprobs | None = None,
    ) -> list[tuple[Sequence, int]]:
        """Record the step's results; `sampled` has one token per scheduled seq with sample=True
        (and `logprobs` one row each, when some asked; `prompt_logprobs` one row per target of
        the chunks that asked). Returns each (sequence, its new token), for the output stage to
        decide stops on. Rows of sequences finished or aborted since the step was scheduled
        are ignored."""
        if prompt_logprobs is not None:
            self._record_prompt_logprobs(plan, prompt_logprobs)
        updated = []
        bm = self.block_manager
        j = -1  # index among the sampled rows
        for s in plan.seqs:
            if not s.sample:
                continue
            j += 1
            token = sampled[j]
            seq = self.seqs.get(s.seq_id)
            if seq is None:
                continue
            end = s.start_pos + len(s.token_ids)  # index of the sampled token
            seq.token_ids[end] = token
            if logprobs is not None and s.logprobs is not None:
                seq.logprobs.append(logprobs.entry(j, token, s.logprobs))
                seq.cumulative_logprob += logprobs.sampled[j]
            if seq.status is SequenceStatus.RUNNING:  # not preempted since
                # (a prefill chunk's blocks were published when it was scheduled: a no-op)
                bm.mark_computed(seq.seq_id, end, seq.token_ids)
            updated.append((seq, token))
        return updated

    def _record_prompt_logprobs(self, plan: StepPlan, lp: TokenLogprobs) -> None:
        """Append each asking chunk's entries to its request's prompt_logprobs (`lp` holds
        them chunk after chunk, in plan order)."""
        row = 0
        for s in plan.seqs:
            if s.prompt_logprobs is None:
                continue
            seq = self.seqs.get(s.seq_id)
            k, targets = s.prompt_logprobs
            for i, target in enumerate(targets):
                j = row + i
                # entry for token start + i + 1; a recomputed chunk (after preemption) adds nothing
                if seq is not None and len(seq.prompt_logprobs) == s.start_pos + i + 1:
                    seq.prompt_logprobs.append(lp.entry(j, target, k))
            row += len(targets)

    def _is_done(self, seq: Sequence, length: int) -> bool:
        """Whether a sequence of `length` tokens has reached max_tokens or max_model_len: no
        slot for a further token is scheduled (the output stage says "length")."""
        return (
            length - seq.num_prompt_tokens >= seq.params.max_tokens or length >= self.max_model_len
        )

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (the output stage decides when) and free its blocks; a slot
        scheduled for a next token (overlapped scheduling) is dropped."""
        if seq.token_ids[-1] == PENDING:
            seq.token_ids.pop()
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq.seq_id)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.seqs.pop(seq.seq_id, None)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
