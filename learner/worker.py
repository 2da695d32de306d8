"""The learner: one DeepSpeed rank per instance. Ray runs one actor per rank; a test can build a
single rank in-process.

Reduction rule: every token's loss is weighted by 1 / (completion tokens in the *global* batch)
(loss.reduction token_mean) or 1 / (its row's tokens x rows in the global batch) (sample_mean), each
kind of row (on-policy, reference) by its own count, and DeepSpeed's own averaging over micro-steps and
ranks is undone, so any split of a TrainBatch across ranks x micro-batches x accumulation gives the
gradient of one big batch. With learner.updates_per_step n, the "global batch" is each of the step's n
mini-batches, and each is one optimizer update. A pipelined step (rollout.pipeline_chunks) hands the
rank its rows in chunks (accumulate), each with the whole step's denominators, then steps once
(apply_step): the same split, arriving in pieces.

KL to a frozen reference (loss.kl_to_reference): each rank holds a frozen copy of the reference model
and scores the micro-batch's sampled tokens under no_grad right before the student's forward (as slime
and verl score log p_ref in the training worker). Kept here rather than in a teacher actor because the
reference scores the STUDENT's prompt (an OPSD teacher sees another), on exactly the micro-batches and
padding the student's log-probs come from, with no [N, T] transport and no extra actor to place. The
price is one more model's weights on each rank (not partitioned under ZeRO-3).
"""
from __future__ import annotations

import math
import os
import time
from typing import Optional, Protocol, Sequence

import torch

from learner import checkpoint
from losses import LossBatch, build_loss
from opd.batching import split_to, token_batches, weightless
from opd.contracts import TrainBatch, trimmed
from opd.env import own_ninja_first
from opd.modeling import (DTYPES, actor_device, completion_hidden, completion_logits, load_named_tensors,
                          load_output_head, output_head, plain_head_problem)
from opd.weight_sync import open_sender
from opd.weight_sync.source import ParamStream


def lr_lambda(schedule: str, total: int, warmup_ratio: float, min_ratio: float):
    warmup = int(round(total * warmup_ratio))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        frac = (step - warmup) / max(1, total - warmup)
        if schedule == "constant":
            return 1.0
        decay = 1 - frac if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
        return min_ratio + (1 - min_ratio) * decay
    return f


def deepspeed_config(cfg, rows_per_step: int) -> dict:
    """DeepSpeed's batch is one optimizer update: rows_per_step / learner.updates_per_step rows. With
    learner.max_tokens_per_micro_batch the micro-batch count varies from update to update: DeepSpeed is
    told one micro-batch of one row per rank, and the learner marks each update's last micro-batch as
    the accumulation boundary itself (set_gradient_accumulation_boundary)."""
    lc = cfg.learner
    rows = rows_per_step // lc.updates_per_step
    micro = lc.micro_batch_size if lc.max_tokens_per_micro_batch is None else 1
    gas = rows // (micro * lc.num_ranks) if lc.max_tokens_per_micro_batch is None else 1
    return {
        "train_batch_size": micro * gas * lc.num_ranks,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": lc.grad_clip,
        "zero_optimization": {"stage": lc.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "steps_per_print": 1 << 30,
    }


def loss_batch(b: TrainBatch, token_counts: tuple[int, int], device: torch.device = torch.device("cpu"),
               reduction: str = "token_mean", reference_logprobs: Optional[torch.Tensor] = None) -> LossBatch:
    """Flatten a micro-batch's [n, T, ...] tensors to the loss's [n*T, ...] rows. token_counts: the
    global (on-policy, reference) denominators of `reduction` (TrainBatch.denominators);
    reference_logprobs: [n, T] log p_ref of a frozen reference model, or None."""
    n, T = b.completion_ids.shape
    flat = lambda x: None if x is None else x.reshape(n * T, *x.shape[2:])  # noqa: E731
    per_row = lambda x: None if x is None else x[:, None].expand(n, T).reshape(-1)  # noqa: E731
    t = b.teacher
    return LossBatch(
        tokens=flat(b.completion_ids),
        weights=flat(_token_weights(b, token_counts, reduction)),
        behaviour_logprobs=flat(b.behaviour_logprobs),
        teacher_sampled_logprobs=None if t is None else flat(t.sampled_logprobs),
        teacher_topk_ids=None if t is None else flat(t.topk_ids),
        teacher_topk_logprobs=None if t is None else flat(t.topk_logprobs),
        student_topk_ids=flat(b.student_topk_ids),
        student_topk_logprobs=flat(b.student_topk_logprobs),
        teacher_at_student_topk=None if t is None else flat(t.at_student_topk),
        teacher_full_logprobs=None if t is None else flat(t.full_logprobs),
        teacher_hidden=None if t is None else flat(t.hidden_states),
        advantages=per_row(b.advantages),
        frozen_reference_logprobs=flat(reference_logprobs),
        is_reference=per_row(b.is_reference),
        seq_ids=torch.arange(n)[:, None].expand(n, T).reshape(-1),  # for discounting within a sequence
    ).to(device)


def _token_weights(b: TrainBatch, counts: tuple[int, int], reduction: str = "token_mean") -> torch.Tensor:
    """[n, T] each token's weight in the loss: mask / its row's global denominator, times the row's teacher
    weight (TrainBatch.row_weights; launch/routing.py defines the weighted loss)."""
    w = b.completion_mask.float() / _row_denominators(b, counts, reduction)[:, None]
    return w if b.row_weights is None else w * b.row_weights.float()[:, None]


def _row_denominators(b: TrainBatch, counts: tuple[int, int], reduction: str = "token_mean") -> torch.Tensor:
    """[n] each row's token weight is 1 / this. token_mean: the global token count of the row's kind
    (on-policy or reference), so each kind's loss is a token mean over the whole batch. sample_mean: the
    row's own token count x the global row count of its kind: a mean per sample, then over samples.
    Either way, however the batch is split."""
    policy, reference = (max(1, c) for c in counts)
    ref = b.is_reference if b.is_reference is not None else torch.zeros(len(b), dtype=torch.bool)
    per_kind = torch.where(ref, float(reference), float(policy))
    if reduction == "token_mean":
        return per_kind
    return per_kind * b.completion_mask.sum(-1).clamp(min=1).float()


class Meeting(Protocol):
    """Where a multi-rank learner's ranks meet (launch/cluster.py gives one): rank 0 posts the address of the
    store it bound, the other ranks wait for it."""
    def post(self, host: str, port: int) -> None: ...
    def wait(self) -> tuple[str, int]: ...


def join_process_group(rank: int, world_size: int, backend: str, meeting: Optional[Meeting] = None) -> None:
    """torch.distributed's world group, which deepspeed.init_distributed then adopts. Rank 0 binds the
    rendezvous store on a port the OS picks while binding, so the port is held from the moment it is known;
    a port picked free in one process and bound later by another can be taken in between (it was, by a
    parallel test run: EADDRINUSE). Rank 0 posts it to `meeting`; the other ranks wait for it there."""
    import datetime

    import torch.distributed as dist
    if dist.is_initialized():  # a process that hosted a learner before (in-process tests) keeps its group
        return
    if world_size > 1 and meeting is None:
        raise ValueError(f"join_process_group: world_size {world_size} needs a meeting for the ranks' rendezvous")
    timeout = datetime.timedelta(minutes=30)  # DeepSpeed's own default for its init
    if rank == 0:
        host = _node_address() if world_size > 1 else "127.0.0.1"
        store = dist.TCPStore(host, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        if world_size > 1:
            meeting.post(host, store.port)
    else:
        host, port = meeting.wait()
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    # what DeepSpeed reads to tell a launched process from one it must discover through MPI
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0", MASTER_ADDR=host,
                      MASTER_PORT=str(store.port))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


class LearnerWorker:
    def __init__(self, cfg, rank: int, world_size: int, rows_per_step: int, teacher_head: Optional[str] = None,
                 meeting: Optional[Meeting] = None):
        """teacher_head: the folder of the frozen teacher whose output layer turns the hidden states it sends
        into logits (teacher.full_vocab_transport: hidden_states); the launcher resolves it from the teacher's
        kind (launch/capabilities.py: teacher_head_path). meeting: where the ranks meet (world_size > 1)."""
        if isinstance(cfg.cluster.threads_per_actor, int):  # auto: the launcher resolves it before any actor starts
            torch.set_num_threads(cfg.cluster.threads_per_actor)
        torch.manual_seed(cfg.run.seed)
        self.device = actor_device(cfg.cluster.num_gpus > 0)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.device.type == "cpu":  # nothing here compiles; DeepSpeed's initialize imports its Muon
            os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # module, whose torch.compile loads inductor (~1 s)
        own_ninja_first()  # one ninja for DeepSpeed's op builds, however this process was started
        import deepspeed
        from transformers import AutoModelForCausalLM
        join_process_group(rank, world_size, "nccl" if self.device.type == "cuda" else "gloo", meeting)
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")  # adopts it
        _forget_stale_deepspeed_groups()
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=DTYPES[cfg.model.dtype],
                                                     trust_remote_code=cfg.model.trust_remote_code)
        lc = cfg.learner
        if lc.gradient_checkpointing:  # each layer's activations recomputed in backward, not kept
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.lora = None
        if cfg.model.lora.r:  # adapters injected in place; the base is frozen, the optimizer sees the adapters
            from learner.lora import LoraStudent
            self.lora = LoraStudent(model, cfg.model.lora)
        trained = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in trained if p.ndim >= 2]
        no_decay = [p for p in trained if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": lc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]  # LoRA: adapters are all matrices (DeepSpeed drops an empty group)
        # fused: one kernel over all parameters (CPU and CUDA); 6x faster than the default on this CPU
        # for an 18M-parameter student (0.05 s against 0.29 s a step)
        opt = (torch.optim.AdamW(groups, lr=lc.lr, betas=tuple(lc.betas), fused=self.device.type in ("cpu", "cuda"))
               if lc.optimizer == "adamw" else torch.optim.SGD(groups, lr=lc.lr))
        sched = torch.optim.lr_scheduler.LambdaLR(  # counts optimizer updates, as slime's train_iters
            opt, lr_lambda(lc.schedule, cfg.run.steps * lc.updates_per_step, lc.warmup_ratio, lc.min_lr_ratio))
        ds_cfg = deepspeed_config(cfg, rows_per_step)
        self.gas = ds_cfg["gradient_accumulation_steps"]
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                    config=ds_cfg)
        if world_size == 1 and lc.zero_stage == 0:  # else DeepSpeed all-reduces one rank's gradients over
            self.engine.enable_backward_allreduce = False  # gloo (ZeRO's reduction also moves them: kept)
        kl = cfg.loss.kl_to_reference
        self.loss = build_loss(cfg.loss.name, dict(cfg.loss.params), temperature=cfg.rollout.temperature,
                               kl_coef=kl.coef, kl_estimator=kl.estimator)
        self.reference = _frozen_reference(cfg, self.device) if self.loss.needs.frozen_reference_logprobs else None
        self.pad_id = model.config.pad_token_id or 0
        self.fused_head = _use_fused_head(lc.fused_head, lc.zero_stage, model)
        # resolved by the launcher (launch/derived.py: resolve_teacher_head_thread); a CPU's cores only
        self.teacher_thread = str(lc.teacher_head_thread).lower() == "true" and self.device.type == "cpu"
        self.frozen_teacher_head = (None if teacher_head is None
                                    else load_output_head(teacher_head, cfg.model.dtype).to(self.device))
        first = cfg.teachers[0] if cfg.teachers else cfg.teacher  # hidden states come from one teacher (launch/routing.py)
        self.live_teacher = first.live
        self.senders: list = []
        self.last_step_skipped = False
        self._step: Optional[dict] = None  # the open step's sums (train_step, or accumulate .. apply_step)

    def student_logits(self, b: TrainBatch) -> torch.Tensor:
        """Student logits at completion positions only: [n, T, V]."""
        return completion_logits(self.engine, b.prompt_ids, b.completion_ids, b.completion_mask, self.pad_id)

    def micro_loss(self, micro: TrainBatch, token_counts: tuple[int, int]):
        """(loss, diagnostics) of one micro-batch: from the student's hidden states and output layer
        (learner.fused_head) or from its logits. A hidden-state teacher's head is applied inside the loss."""
        ref = None if self.reference is None else self.reference_logprobs(micro)
        batch = loss_batch(micro, token_counts, self.device, self.cfg.loss.reduction, ref)
        teacher_head = self.teacher_head() if micro.teacher is not None and micro.teacher.hidden_states is not None \
            else None
        if self.fused_head:
            hidden = completion_hidden(self.engine, micro.prompt_ids, micro.completion_ids, micro.completion_mask,
                                       self.pad_id)
            head = output_head(self.engine.module)
            return self.loss.from_hidden(hidden.reshape(-1, hidden.shape[-1]), head, batch, teacher_head,
                                         self.teacher_thread)
        logits = self.student_logits(micro)
        return self.loss(logits.reshape(-1, logits.shape[-1]), batch, teacher_head)

    @torch.no_grad()
    def reference_logprobs(self, b: TrainBatch) -> torch.Tensor:
        """[n, T] log p_ref(y_t) of the frozen reference at the loss temperature (0 on padding)."""
        logits = completion_logits(self.reference, b.prompt_ids, b.completion_ids, b.completion_mask, self.pad_id)
        z = logits.float() / self.loss.temperature
        del logits
        ids = b.completion_ids.to(z.device)[..., None]
        out = z.gather(-1, ids).squeeze(-1) - torch.logsumexp(z, -1)
        return out.masked_fill(~b.completion_mask.to(z.device), 0.0)

    def teacher_head(self):
        """The output layer that turns teacher hidden states into logits: the frozen teacher's, loaded
        once, or for a live self-teacher the student's own current one (the teacher holds the weights
        of the last sync, which are the learner's until this step's optimizer update)."""
        if self.frozen_teacher_head is not None:
            return self.frozen_teacher_head
        if not self.live_teacher:  # the student's head on a frozen teacher's states would be a quiet error
            raise ValueError("a frozen teacher sent hidden states and this learner holds no teacher head: build "
                             "LearnerWorker(teacher_head=<the teacher's folder>) (launch/capabilities.py: teacher_head_path)")
        return output_head(self.engine.module).detach()

    def train_step(self, shard: TrainBatch, token_counts, update_rows: Optional[list[int]] = None) -> dict[str, float]:
        """The step's optimizer updates on this rank's shard. token_counts: the global (on-policy,
        reference) denominators of loss.reduction (TrainBatch.denominators), one pair, or one pair per
        update (learner.updates_per_step): the shard is then that many parts in order, part j this rank's
        rows of update j (equal parts, or `update_rows[j]` rows each when ranks got rows by tokens).

        Micro-batches: micro_batch_size rows in order, or with learner.max_tokens_per_micro_batch rows
        grouped by length to that many padded tokens, each padded to its own longest row (_micro_batches).
        Either way every token's weight is set by the global denominators, so the update's gradient is
        the whole batch's.

        A non-finite loss or gradient norm skips the update: the weights, the optimizer's moments and the
        learning-rate schedule stay as they were. Every rank takes the same decision (ZeRO stage 0:
        a flag all-reduced before the step; stages 1-3: DeepSpeed's own overflow check, collective).
        `skipped_nonfinite` is 1 when every update of the step was skipped (the weights did not change);
        with several updates, `skipped_updates` counts them. Loss, diagnostics and grad_norm are means
        over the updates."""
        self._begin_step()
        updates = [token_counts] if isinstance(token_counts[0], int) else list(token_counts)
        n = len(updates)
        budget = self.cfg.learner.max_tokens_per_micro_batch
        if update_rows is None:
            mb = self.cfg.learner.micro_batch_size if budget is None else len(shard) // n
            assert len(shard) == mb * (self.gas if budget is None else 1) * n, \
                f"rank {self.rank}: shard of {len(shard)} rows, expected {mb * self.gas * n}"
            update_rows = [len(shard) // n] * n
        bounds = [sum(update_rows[:j]) for j in range(n + 1)]
        for j, counts in enumerate(updates):
            self._backward_rows(shard, range(bounds[j], bounds[j + 1]), counts, last=True)
            self._update()
        return self._end_step(n)

    def accumulate(self, chunk: TrainBatch, token_counts: tuple[int, int], last: bool = False) -> None:
        """Forward and backward of one chunk of a pipelined step (rollout.pipeline_chunks): this rank's rows
        of the chunk, with the WHOLE step's global denominators (TrainBatch.denominators over every chunk),
        so the gradients the chunks accumulate are the one-call step's. The first call of a step opens it;
        `last`: the step's final chunk, whose last micro-batch is the accumulation boundary (DeepSpeed's
        reductions run in its backward). apply_step() then takes the one optimizer step. One update per
        step (learner.updates_per_step 1); chunks of whole micro-batches (launch/validation.py)."""
        t = time.perf_counter()
        if self._step is None:
            self._begin_step()
        if self.cfg.learner.max_tokens_per_micro_batch is None:
            assert len(chunk) % self.cfg.learner.micro_batch_size == 0, \
                f"rank {self.rank}: chunk of {len(chunk)} rows, not whole micro-batches of {self.cfg.learner.micro_batch_size}"
        self._backward_rows(chunk, range(len(chunk)), token_counts, last)
        self._step["last_seen"] = last
        self._step["busy"] += time.perf_counter() - t  # the calls' own time, not the waits between them

    def apply_step(self) -> dict[str, float]:
        """The optimizer step after a pipelined step's last chunk (accumulate(..., last=True)); answers the
        step's metrics as train_step does: sums over every chunk's micro-batches."""
        assert self._step is not None and self._step["last_seen"], "apply_step before the step's last chunk"
        t = time.perf_counter()
        self._update()
        self._step["busy"] += time.perf_counter() - t
        return self._end_step(1)

    def _begin_step(self) -> None:
        self.engine.train()
        self._step = {"t0": time.perf_counter(), "busy": 0.0, "sums": {}, "norms": [], "padded": 0, "real": 0,
                      "overflows": self.engine.skipped_steps, "last_seen": False,
                      "loss_sum": torch.zeros((), dtype=torch.float64, device=self.device)}

    def _backward_rows(self, shard: TrainBatch, rows: range, counts: tuple[int, int], last: bool) -> None:
        """Forward and backward of `rows` of the shard, micro-batch by micro-batch, each followed by DeepSpeed's
        (non-boundary) engine.step(), except the update's final one when `last`: its backward is at the
        accumulation boundary and _update() steps."""
        st, budget = self._step, self.cfg.learner.max_tokens_per_micro_batch
        plan = self._micro_plan(shard, rows)
        for i, mrows in enumerate(plan):  # each micro-batch copied out only when its turn comes
            final = last and i == len(plan) - 1
            if budget is None:
                micro = shard.select(mrows)
            else:  # the update's last micro-batch is its boundary, however many there are
                self.engine.set_gradient_accumulation_boundary(final)
                # nothing left to split (_micro_plan): a row of zero weight keeps the count
                micro = trimmed(shard.select(mrows) if mrows else weightless(shard.select([rows.start])))
            st["padded"] += micro.completion_ids.numel()
            st["real"] += micro.loss_tokens
            loss, diags = self.micro_loss(micro, counts)
            st["loss_sum"] += loss.detach().to(torch.float64)
            for k, v in {"loss": loss.detach(), **diags}.items():
                st["sums"][k] = st["sums"].get(k, 0.0) + torch.as_tensor(v, dtype=torch.float64, device=self.device)
            # DeepSpeed divides by gas and averages over ranks; our weights already sum to 1 globally.
            self.engine.backward(loss * self.gas * self.world_size)
            boundary = self.engine.is_gradient_accumulation_boundary()
            assert boundary == final, f"rank {self.rank}: micro-batch {i} of {len(plan)}: accumulation boundary " \
                f"{boundary}, expected {final}"
            if not final:
                self.engine.step()  # not a boundary: DeepSpeed only counts the micro-step

    def _update(self) -> None:
        """The optimizer update at the accumulation boundary (its backward done), or its skip when the loss
        or the gradient is not finite (ZeRO stage 0 here; stages 1-3 in DeepSpeed's own step)."""
        st, grad_norm = self._step, None
        if self.cfg.learner.zero_stage == 0:
            grad_norm = self._grad_norm()  # ZeRO stages report their own; stage 0 does not
            if self._all_agree_nonfinite(st["loss_sum"], grad_norm):
                self._skip_boundary_step()
            else:
                self.engine.step()
        else:
            self.engine.step()
        st["norms"].append(self.engine.get_global_grad_norm() if self.cfg.learner.zero_stage > 0 else grad_norm)
        st["loss_sum"] = torch.zeros((), dtype=torch.float64, device=self.device)

    def _end_step(self, n: int) -> dict[str, float]:
        """The step's metrics (means over its n updates) and its end."""
        st, self._step = self._step, None
        skipped = self.engine.skipped_steps - st["overflows"]
        self.last_step_skipped = skipped == n
        sums = st["sums"]
        keys = sorted(sums)
        vec = self._sum_over_ranks(torch.stack([sums[k] for k in keys]))
        out = {k: float(v) / n for k, v in zip(keys, vec)}
        norms = [float(g) if g is not None else float("nan") for g in st["norms"]]
        out["grad_norm"] = sum(norms) / n
        out["lr"] = float(self.engine.get_lr()[0])
        out["skipped_nonfinite"] = float(skipped == n)
        if n > 1:
            out["skipped_updates"] = float(skipped)
        out["padding_fraction"] = 1.0 - st["real"] / max(1, st["padded"])  # this rank's completion columns that are padding
        # the step itself, without the calls' transport (a pipelined step: its calls' time, not the waits between)
        out["compute_s"] = st["busy"] or time.perf_counter() - st["t0"]
        return out

    def _micro_plan(self, shard: TrainBatch, rows: range) -> list[list[int]]:
        """One update's micro-batches, as rows of the shard: micro_batch_size rows at a time in order
        (learner.max_tokens_per_micro_batch null: today's layout, padded to the shard's longest row), or
        rows grouped by length to that token budget (each then cut to its own longest completion). With
        several ranks, every rank runs the same number of micro-batches (DeepSpeed's reductions are
        collectives): a rank with fewer splits its largest, or gets [] (a row with no weight)."""
        budget = self.cfg.learner.max_tokens_per_micro_batch
        if budget is None:
            mb = self.cfg.learner.micro_batch_size
            return [list(range(s, s + mb)) for s in range(rows.start, rows.stop, mb)]
        lengths = shard.completion_mask[rows.start:rows.stop].sum(-1).tolist()
        prompts = [len(p) for p in shard.prompt_ids[rows.start:rows.stop]]
        plan = [[rows.start + i for i in g] for g in token_batches(prompts, lengths, budget)]
        if self.world_size > 1:
            import torch.distributed as dist
            count = self._sum_over_ranks(torch.tensor([float(len(plan))], device=self.device), dist.ReduceOp.MAX)
            plan = split_to(plan, int(count.item()))
        return plan

    def _sum_over_ranks(self, x: torch.Tensor, op=None) -> torch.Tensor:
        """all_reduce (sum, or `op`) across the learner ranks; one rank has nothing to reduce."""
        if self.world_size > 1:
            import torch.distributed as dist
            dist.all_reduce(x, op=dist.ReduceOp.SUM if op is None else op)
        return x

    def _skip_boundary_step(self) -> None:
        """engine.step() at an accumulation boundary less the optimizer and the LR scheduler, as
        DeepSpeed's own overflow path does under ZeRO: gradients dropped, the step counted as skipped."""
        e = self.engine
        e.zero_grad()
        e.micro_steps += 1
        e.global_steps += 1
        e.skipped_steps += 1

    def _all_agree_nonfinite(self, loss_sum: torch.Tensor, grad_norm: float) -> bool:
        """True on every rank when any rank's loss or the (already all-reduced) gradient is not finite."""
        import torch.distributed as dist
        flag = torch.tensor([0.0 if math.isfinite(float(loss_sum)) and math.isfinite(grad_norm) else 1.0],
                            device=self.device)
        return bool(self._sum_over_ranks(flag, dist.ReduceOp.MAX).item())

    def _grad_norm(self) -> float:
        """Pre-clipping global gradient norm (stage 0 holds full, all-reduced gradients)."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    def weights(self, dtype: Optional[torch.dtype] = None) -> ParamStream:
        """The student's weights as a stream (ZeRO-3 shards gathered per bucket: every rank iterates)."""
        return self._stream(dtype, touched_only=True)

    def _stream(self, dtype: Optional[torch.dtype], touched_only: bool) -> ParamStream:
        """A LoRA student streams merged weights under the base model's names: for a sync (touched_only),
        only the modules its adapters can change; for an export, all of them."""
        if self.lora is None:
            return ParamStream(self.engine.module, dtype)
        return ParamStream(self.engine.module, dtype, parts=self.lora.parts(self.engine.module, touched_only),
                           complete=not touched_only)

    def export_weights(self) -> Optional[dict[str, torch.Tensor]]:
        """Full student weights as CPU tensors on rank 0 (None elsewhere), a LoRA student's merged. A collective."""
        weights = self._stream(None, touched_only=False).to_cpu_dict()
        return weights if self.rank == 0 else None

    def export_adapter(self) -> Optional[dict[str, torch.Tensor]]:
        """A LoRA student's adapter matrices under peft's names, as CPU tensors on rank 0 (None elsewhere,
        and without LoRA). A collective under ZeRO-3."""
        if self.lora is None:
            return None
        adapter = ParamStream(self.engine.module, parts=self.lora.adapter_parts(self.engine.module)).to_cpu_dict()
        return adapter if self.rank == 0 else None

    def save_hf(self, path: str, tokenizer_path: str) -> None:
        """Write a Hugging Face model directory (rank 0) that from_pretrained loads; a LoRA student's is the
        merged model, with its adapter in path/adapter (peft format)."""
        weights, adapter = self.export_weights(), self.export_adapter()
        if self.rank != 0:
            return
        if adapter is not None:
            from learner.lora import ADAPTER_DIR
            self.lora.save_adapter(os.path.join(path, ADAPTER_DIR), adapter)
        from transformers import AutoModelForCausalLM, AutoTokenizer
        trust = self.cfg.model.trust_remote_code
        model = AutoModelForCausalLM.from_pretrained(self.cfg.model.path, dtype=DTYPES[self.cfg.model.dtype],
                                                     trust_remote_code=trust)
        load_named_tensors(model, weights)
        model.save_pretrained(path)  # with generation_config.json: its stop ids travel with the model
        AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=trust).save_pretrained(path)

    def init_weight_sync(self, groups: Sequence[dict]) -> None:
        """Open one sender per target group: {"backend": gloo|nccl|ipc, "dtype": wire dtype name,
        "targets": receiver handles, "workers": receiver workers per target}. Called on every rank;
        rank 0 owns each transfer group, on a port of its own (DeepSpeed's is taken)."""
        for g in groups:
            self.senders.append(open_sender(g["backend"], self.weights(DTYPES[g["dtype"]]), g["targets"], g["workers"],
                                            rank=self.rank, address=_node_address(),
                                            close_timeout_s=self.cfg.sync.close_timeout_s))

    def sync_weights(self, version: int) -> None:
        """Push the current weights to every receiver, tagged `version`. Called on every rank."""
        for sender in self.senders:
            sender.send(version)

    def sync_after_step(self, version: int, wait_for: list) -> Optional[float]:
        """The overlapped loop's weight sync, sent with train_step so it runs right behind it: once
        `wait_for` (the engines' replies to the generation in flight) exist, push the weights of the
        step just taken, tagged `version`, and answer the seconds the sending took. Waiting for those
        replies is what keeps the sync from landing mid-generation. Sends nothing and answers None when
        that step was skipped or a reply is an error or late: the driver then replaces the engine and
        syncs itself. Every rank answers alike (the decision is all-reduced before the sync, itself a
        collective)."""
        import ray
        import torch.distributed as dist
        ok = not self.last_step_skipped
        if ok:
            try:
                ray.get(wait_for, timeout=self.cfg.cluster.call_timeout_s)
            except Exception:  # noqa: BLE001 - a lost engine (RayActorError, GetTimeoutError): the driver's to handle
                ok = False
        flag = torch.tensor([0.0 if ok else 1.0], device=self.device)
        if self._sum_over_ranks(flag, dist.ReduceOp.MAX).item():
            return None
        t0 = time.perf_counter()
        self.sync_weights(version)
        return time.perf_counter() - t0

    def close_weight_sync(self) -> list:
        """Close every transfer group, waiting at most sync.close_timeout_s per group. Best effort: after a
        receiver died the driver reopens the groups with its replacement, and the dead receiver cannot take
        part in closing the old ones. Returns the receivers that did not close (dead, or stuck in a
        broadcast): the driver replaces the live ones rather than waiting on them."""
        unclosed = []
        for sender in self.senders:
            try:
                unclosed += sender.shutdown()
            except Exception as e:  # noqa: BLE001 - see above; the live receivers have closed their ends
                print(f"learner rank {self.rank}: closing a weight-sync group: {type(e).__name__}", flush=True)
        self.senders = []
        return unclosed

    def release_memory(self) -> None:
        """Colocated engines wake after the learner's step into the GPU memory it leaves: hand back the
        blocks its allocator caches, or they stay reserved for the learner while vLLM re-maps its share."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def save_checkpoint(self, directory: str, step: int, state: dict) -> str:
        """Write step `step`'s checkpoint atomically (learner/checkpoint.py): DeepSpeed's weights,
        optimizer and scheduler, this rank's torch generator states, and `state` (the driver's: data
        position, weight version) in the marker. Called on every rank; returns the folder."""
        import torch.distributed as dist
        tmp = checkpoint.staging(directory, step)
        if self.rank == 0 and tmp.exists():
            import shutil
            shutil.rmtree(tmp)
        dist.barrier()
        # A LoRA student's base never changes (model.path holds it): the checkpoint carries the adapters only.
        self.engine.save_checkpoint(directory, tag=tmp.name, client_state=state, save_latest=False,
                                    exclude_frozen_parameters=self.lora is not None)
        torch.save(_rng_state(), tmp / f"rng_rank{self.rank}.pt")
        dist.barrier()  # every rank's files are written before the folder is sealed
        done = str(checkpoint.seal(directory, step, state)) if self.rank == 0 else ""
        dist.barrier()
        return done

    def load_checkpoint(self, path: str) -> None:
        """Restore a complete checkpoint folder (learner state and generators; the driver reads the rest
        from its marker)."""
        p = os.path.abspath(path)
        try:
            loaded, _ = self.engine.load_checkpoint(os.path.dirname(p), tag=os.path.basename(p),
                                                    load_module_strict=self.lora is None)
            if loaded is None:  # DeepSpeed warns and returns nothing when the files are missing
                raise FileNotFoundError("no DeepSpeed model states in it")
            _set_rng_state(torch.load(os.path.join(p, f"rng_rank{self.rank}.pt"), weights_only=False))
        except Exception as e:  # noqa: BLE001 - DeepSpeed and torch raise many kinds; say which checkpoint
            raise RuntimeError(f"checkpoint {p}: cannot be loaded on rank {self.rank} "
                               f"({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]})") from e


def _forget_stale_deepspeed_groups() -> None:
    """DeepSpeed caches process groups in module globals (deepspeed.utils.groups) and reuses them in the next
    deepspeed.initialize. A process that hosts a learner after its torch.distributed group was torn down (an
    in-process vLLM engine's shutdown, a unit test's destroy_process_group) would hand DeepSpeed a group that
    torch no longer knows ("Group ... is not registered"). Drop the cached groups torch no longer registers;
    DeepSpeed makes fresh ones from the current world group."""
    import torch.distributed.distributed_c10d as c10d
    from deepspeed.utils import groups
    live = c10d._world.pg_group_ranks
    for name, value in list(vars(groups).items()):
        if isinstance(value, c10d.ProcessGroup) and value not in live:
            setattr(groups, name, None)
        elif isinstance(value, dict) and any(isinstance(v, c10d.ProcessGroup) and v not in live for v in value.values()):
            value.clear()


def _use_fused_head(setting: str, zero_stage: int, model) -> bool:
    """learner.fused_head: auto -> wherever it is exact and the whole head is on this rank."""
    problem = plain_head_problem(model) or ("ZeRO stage 3 partitions the output layer" if zero_stage == 3 else None)
    if setting == "true" and problem:
        raise ValueError(f"learner.fused_head: true, but {problem}; use auto or false")
    return setting != "false" and problem is None


def _frozen_reference(cfg, device: torch.device):
    """The frozen reference model of loss.kl_to_reference: its path, or the student's initial weights."""
    from transformers import AutoModelForCausalLM
    path = cfg.loss.kl_to_reference.path or cfg.model.path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.model.dtype]).to(device).eval()
    model.requires_grad_(False)
    return model


def _rng_state() -> dict:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _node_address() -> str:
    import ray
    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
