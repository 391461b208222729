"""The training data as a map-style dataset of whole steps: key (epoch, step) -> this rank's TrainBatch.

Usage (one process or each rank of torchrun)::

    ds = TrainDataset(cfg.data, tokenizer, per_device_batch_size=16, world_size=ws, rank=rank)
    print(ds.summary())
    epoch, step = ds.position(global_batches_done)          # resume point
    for batch in build_dataloader(ds, epoch, step, num_batches=remaining):
        batch = batch.to(device)                            # TrainBatch; batch.epoch/.step = its position
        model(batch.query, batch.passage, batch.messages, batch.teacher_scores, ...)

Every batch is a pure function of (seed, epoch, step, rank), so the number of
DataLoader workers and restarts never change what the model sees; the
sampler position to checkpoint is just the count of batches consumed.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from torch.utils.data import DataLoader, Dataset, Sampler

from denselm.data.collate import Group, TrainBatch, collate_groups, document_id
from denselm.data.config import DataConfig
from denselm.data.formats import (
    DataError,
    FileIndex,
    JsonlFile,
    TaskSpec,
    TASK_TYPES,
    discover_files,
    index_file,
    task_group_size,
)
from denselm.data.sampling import (
    DatasetPlan,
    batches_per_epoch,
    cap_indices,
    epoch_batches,
    group_rng,
    sample_group,
    sample_icl,
)
from denselm.data.templates import check_template_tokens, get_template
from denselm.errors import ConfigError


@dataclass
class DatasetInfo:
    """One training file after validation, with the settings that apply to it."""

    name: str
    """The file path (TrainBatch.dataset)."""
    source: str
    """The data.train_data entry it was found under."""
    index: FileIndex
    spec: TaskSpec
    mode: str
    """"normal" or "custom"."""
    group_size: int
    batch_size: int
    """Global batch size (all ranks)."""
    weight: float
    plan: DatasetPlan
    num_short_negatives: int
    """Examples with fewer negatives than the group needs (their list gets repeated)."""

    @property
    def batches_per_epoch(self) -> int:
        return batches_per_epoch(self.plan)


logger = logging.getLogger(__name__)


def dataset_keys(name: str, source: str) -> tuple[str, ...]:
    """Names a per-dataset setting may use, most specific first: file path, file name, stem
    (``api`` for ``api.jsonl.gz`` too), the train_data entry."""
    bare = Path(name).name
    for suffix in (".gz", ".jsonl", ".json"):
        bare = bare.removesuffix(suffix)
    return (name, Path(name).name, Path(name).stem, bare, source)


def _lookup(mapping: dict, name: str, source: str, default):
    """A per-dataset setting by file path, file name, file stem or train_data entry (most specific first)."""
    for key in dataset_keys(name, source):
        if key in mapping:
            return mapping[key]
    return default


class TrainDataset(Dataset):
    """Validated training files -> same-dataset global batches -> this rank's TrainBatch per step."""

    def __init__(self, cfg: DataConfig, tokenizer, per_device_batch_size: int, world_size: int = 1, rank: int = 0):
        if isinstance(per_device_batch_size, bool) or not isinstance(per_device_batch_size, int) or per_device_batch_size < 1:
            raise ValueError(f"per_device_batch_size must be an integer >= 1, got {per_device_batch_size!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        if not cfg.train_data:
            raise ConfigError("data.train_data is empty: give at least one JSONL file or folder")
        self.cfg, self.tokenizer = cfg, tokenizer
        self.world_size, self.rank = world_size, rank
        self.global_batch_size = per_device_batch_size * world_size
        symmetric_batch = cfg.symmetric_batch_size or self.global_batch_size
        if symmetric_batch % world_size:
            raise ConfigError(
                f"data.symmetric_batch_size={symmetric_batch} must be divisible by the world size {world_size}"
            )
        template = get_template(cfg.template)
        check_template_tokens(tokenizer, template)

        started = time.perf_counter()
        files = discover_files(cfg.train_data)
        for key_field, mapping in (("dataset_weights", cfg.dataset_weights), ("dataset_modes", cfg.dataset_modes)):
            for key in mapping:
                if not any(key in dataset_keys(f, src) for f, src in files):
                    raise DataError(f"data.{key_field}[{key!r}]: matches no training file")
        self.datasets: list[DatasetInfo] = []
        for d, (name, source) in enumerate(files):
            index = index_file(
                name, cfg.group_size, cfg.symmetric_group_size, cfg.max_class_neg,
                prompt_available=cfg.prompt is not None or not template.needs_prompt,
            )
            spec = TASK_TYPES[index.type]
            group_size = task_group_size(spec, cfg.group_size, cfg.symmetric_group_size, cfg.max_class_neg)
            batch_size = symmetric_batch if spec.symmetric_batch else self.global_batch_size
            weight = float(_lookup(cfg.dataset_weights, name, source, 1.0))
            plan = DatasetPlan(cap_indices(len(index), cfg.max_examples_per_dataset, cfg.seed, d), batch_size, weight)
            self.datasets.append(DatasetInfo(
                name=name, source=source, index=index, spec=spec,
                mode=_lookup(cfg.dataset_modes, name, source, spec.mode),
                group_size=group_size, batch_size=batch_size, weight=weight, plan=plan,
                num_short_negatives=int((index.num_neg[plan.indices] < group_size - 1).sum()),
            ))
        self.index_seconds = time.perf_counter() - started
        self.steps_per_epoch = sum(info.batches_per_epoch for info in self.datasets)
        if self.steps_per_epoch == 0:
            sizes = ", ".join(f"{Path(i.name).name}: {len(i.plan.indices)}" for i in self.datasets)
            raise DataError(
                f"no complete global batch of {self.global_batch_size} queries in any dataset ({sizes}); "
                "lower the batch size or add data (data.train_data)"
            )
        for info in self.datasets:
            if info.batches_per_epoch == 0 and len(info.plan.indices) > 0:
                # Batches never mix datasets and each pass is cut separately (the seed's rule),
                # so a dataset smaller than one batch is silently never drawn: say so.
                logger.warning("%s: %d examples make no complete batch of %d queries; this dataset is never "
                               "drawn (merge it into another file or lower the batch size)",
                               info.name, len(info.plan.indices), info.batch_size)
        self.files = [JsonlFile(info.index) for info in self.datasets]
        self._plan: tuple[int, list] | None = None

    # --- positions ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.steps_per_epoch

    def position(self, batches_done: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of the next batch after ``batches_done`` batches."""
        return divmod(int(batches_done), self.steps_per_epoch)

    def epoch_plan(self, epoch: int) -> list:
        """[(dataset index, (global batch,) example indices)] for every step of the epoch (cached)."""
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, epoch_batches([i.plan for i in self.datasets], self.cfg.seed, epoch))
        return self._plan[1]

    # --- batches -------------------------------------------------------------------------------------

    def global_groups(self, epoch: int, step: int) -> tuple[DatasetInfo, list[Group]]:
        """The text groups of the whole global batch at (epoch, step): identical on every rank."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} out of range: an epoch has {self.steps_per_epoch} steps")
        d, indices = self.epoch_plan(epoch)[step]
        info, file = self.datasets[d], self.files[d]
        examples = [file.read(int(i)) for i in indices]
        query_keys = [(ex.prompt, ex.query) for ex in examples]
        groups = []
        for k, ex in enumerate(examples):
            rng = group_rng(self.cfg.seed, epoch, step, k)
            pos, negs, repeated = sample_group(len(ex.pos), len(ex.neg), info.group_size, rng)
            scores = None
            if ex.has_scores:
                scores = [ex.pos_scores[pos]] + [ex.neg_scores[j] for j in negs]
            response = ex.category if info.spec.icl_response == "category" and ex.category else ex.pos[pos]
            groups.append(Group(
                query=ex.query,
                prompt=ex.prompt if ex.prompt is not None else self.cfg.prompt,
                passages=[ex.pos[pos]] + [ex.neg[j] for j in negs],
                scores=scores,
                icl_response=response,
                examples=sample_icl(k, query_keys, self.cfg.icl_max_examples, rng),
                repeated_negatives=repeated,
                **(self._document_ids(ex, pos, negs) if self.cfg.mask_same_document else {}),
            ))
        return info, groups

    @staticmethod
    def _document_ids(ex, pos: int, negs) -> dict:
        """Group.passage_ids / positive_ids for data.mask_same_document."""
        return {
            "passage_ids": [document_id(ex.pos, ex.pos_ids, pos)] + [document_id(ex.neg, ex.neg_ids, j) for j in negs],
            "positive_ids": [document_id(ex.pos, ex.pos_ids, j) for j in range(len(ex.pos))],
        }

    def batch(self, epoch: int, step: int) -> TrainBatch:
        """This rank's TrainBatch at (epoch, step)."""
        info, groups = self.global_groups(epoch, step)
        return collate_groups(
            groups, self.tokenizer, self.cfg, info.spec, info.mode, info.name,
            rank=self.rank, world_size=self.world_size, epoch=epoch, step=step,
        )

    def __getitem__(self, key) -> TrainBatch:
        if isinstance(key, tuple):
            return self.batch(*key)
        return self.batch(0, int(key))  # an integer key is a step of the first epoch

    # --- reporting -------------------------------------------------------------------------------------

    def summary(self) -> str:
        """A few lines for the log: per dataset its size, settings and negative repetition."""
        total_mb = sum(i.index.num_bytes for i in self.datasets) / 1e6
        lines = [
            f"training data: {len(self.datasets)} dataset(s), {total_mb:.1f} MB validated in "
            f"{self.index_seconds:.1f} s; {self.steps_per_epoch} steps/epoch of {self.global_batch_size} queries"
        ]
        for i in self.datasets:
            lines.append(
                f"  {i.name}: {len(i.index)} examples ({len(i.plan.indices)} kept), type {i.spec.type}, "
                f"mode {i.mode}, group {i.group_size}, batch {i.batch_size}, weight {i.weight:g}, "
                f"{i.batches_per_epoch} batches/epoch, {i.num_short_negatives} with too few negatives "
                f"(repeated), {i.index.num_with_scores} with teacher scores"
            )
        return "\n".join(lines)


class StepSampler(Sampler):
    """Yields (epoch, step) keys from a start position: the resumable order of a run."""

    def __init__(self, steps_per_epoch: int, start_epoch: int = 0, start_step: int = 0, num_batches: int | None = None):
        if not 0 <= start_step < steps_per_epoch:
            raise ValueError(f"start_step {start_step} out of range: an epoch has {steps_per_epoch} steps")
        self.steps_per_epoch, self.start = steps_per_epoch, (start_epoch, start_step)
        self.num_batches = num_batches

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, step = self.start
        produced = 0
        while self.num_batches is None or produced < self.num_batches:
            yield epoch, step
            produced += 1
            step += 1
            if step == self.steps_per_epoch:
                epoch, step = epoch + 1, 0

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an endless StepSampler has no length; pass num_batches")
        return self.num_batches


def build_dataloader(
    dataset: TrainDataset,
    start_epoch: int = 0,
    start_step: int = 0,
    num_batches: int | None = None,
    num_workers: int | None = None,
    pin_memory: bool = False,
    prefetch_factor: int = 4,
) -> DataLoader:
    """A DataLoader of TrainBatch objects (batch_size=None: the dataset returns whole steps).

    ``num_batches=None`` runs forever (across epochs); workers default to
    data.num_workers.  Batches arrive in sampler order whatever the worker count.
    """
    workers = dataset.cfg.num_workers if num_workers is None else num_workers
    if workers > 0:
        # the parent already used the (Rust) tokenizer; without this every forked worker warns
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=StepSampler(dataset.steps_per_epoch, start_epoch, start_step, num_batches),
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if workers > 0 else None,
        persistent_workers=False,
    )
