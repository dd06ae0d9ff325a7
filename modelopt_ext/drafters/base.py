"""The drafter interface: everything the pipeline asks a kind of drafter (EAGLE-3, DFlash, a plugin of yours).

The trainer, the supervision sources, the servers, the entry scripts, export, the serve commands and
specdec_bench never name a drafter. They hold a `Drafter` (chosen by the recipe's `drafter:` field, see
`modelopt_ext.drafters.resolve_drafter`) and ask it:

- its recipe section (`section`, validated by `Settings`) and defaults;
- which target layers it reads (`default_layer_ids`; `drafters/layers.py` applies
  it and validates the result). Every drafter gets the same supervision (`targets/supervision.py`): the hidden
  states of its layers, concatenated in order, and the target's next-token distribution;
- its draft vocabulary size (`draft_vocab_size`);
- how to build its model from the target's config and its training objective (`build`, returning a `Built`);
- its serialized format: checkpoint config <-> export folder for vLLM/SGLang (`export`, `check_export`,
  `load`, `owns_config`), the engine flags that load it (`vllm_speculative_config`, `sglang_args`, with the
  drafter's own defaults for the draft length), and what SGLang needs changed in a folder (`sglang_folder`);
- its acceptance-benchmark proposer (`proposer`).

Contract for the objective: `loss_fn(model, supervision, vocab, head) -> (loss, metrics)`, where metrics
hold `acc_<j>` (top-1 accuracy of the j-th drafted token), `loss_<j>`, `sim_accept_len` (the acceptance
length those accuracies imply) and `valid_positions`; progress lines, plots and the run summary read those.

This module and every drafter's package `__init__` import no torch: the launcher validates recipes on a
login node. Torch-side code lives in the drafter's own modules and is imported inside the methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel

# (model, supervision, draft vocab, target head) -> (loss, metrics); see the module docstring.
LossFn = Callable[..., tuple[Any, dict[str, Any]]]


@dataclass
class Built:
    """A freshly built drafter for training: the module, the config its checkpoints carry, its objective."""

    model: Any  # torch.nn.Module; its state_dict is what checkpoints hold
    config: dict[str, Any]  # JSON-ready; written as the checkpoint's config.json (with `drafter`)
    loss_fn: LossFn
    notes: list[str] = field(default_factory=list)  # one-line facts for the training log


@dataclass
class SglangFolder:
    """What SGLang needs changed in a local drafter folder; nothing set = SGLang loads the folder as it is.

    When something is set, `deploy/sglang.py` writes a copy `<folder>-sglang` (atomically; unchanged files
    hard-linked; the original untouched) with `config_changes` merged into config.json, weight names starting
    with `rename[0]` renamed to start with `rename[1]`, and `token_ids` saved as SGLang's token map.
    """

    config_changes: dict = field(default_factory=dict)
    rename: tuple[str, str] | None = None
    token_ids: Any = None  # int64 tensor of target token ids -> `--speculative-token-map`
    token_map_pending: bool = False  # a token map whose ids are known only once the checkpoint is exported
    notes: list[str] = field(default_factory=list)

    @property
    def needs_copy(self) -> bool:
        return bool(self.config_changes or self.rename or self.token_ids is not None or self.token_map_pending)


class Drafter(ABC):
    """One kind of drafter. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]  # the recipe's `drafter:` value; recipes live in recipes/<name>/
    section: ClassVar[str]  # the recipe section holding its settings (e.g. `eagle` for EAGLE-3)
    Settings: ClassVar[type[BaseModel]]  # that section's schema (extra keys forbidden)
    summary: ClassVar[str] = ""
    sglang_algorithms: ClassVar[tuple[str, ...]] = ()  # SGLang algorithms that serve it; the first by default

    # --- torch-free: the launcher, job_info and the serve commands call these ----------------------------

    @abstractmethod
    def default_layer_ids(self, num_layers: int, settings: BaseModel) -> list[int]:
        """Target layers read when the recipe names none (`model.aux_layer_ids`), in vLLM's numbering."""

    def check_target(self, settings: BaseModel, target_config: dict) -> list[str]:
        """Problems (one line each, naming the recipe field) with these settings for this target's config
        (a config.json dict); checked before anything heavy loads. Layer ids are checked elsewhere
        (drafters/layers.py)."""
        return []

    def draft_vocab_size(self, settings: BaseModel, target_vocab_size: int) -> int:
        """How many target tokens the drafter's lm_head predicts over (default: all of them)."""
        return target_vocab_size

    @abstractmethod
    def owns_config(self, config: dict) -> bool:
        """Whether a folder's config.json (a checkpoint of ours or an export) is this drafter's."""

    @abstractmethod
    def layer_ids_of(self, config: dict) -> list[int]:
        """The target layers (vLLM numbering) a checkpoint or export config says the drafter reads."""

    def default_num_steps(self, config: dict) -> int:
        """Draft tokens per round when a benchmark or serve command names none, for a checkpoint's or export's
        config.json (EAGLE-3: 3; a block drafter: its block size - 1)."""
        return 3

    @abstractmethod
    def vllm_speculative_config(
        self, draft_path: str, num_speculative_tokens: int | None, folder: Path | None
    ) -> dict:
        """vLLM's `--speculative-config` for the drafter at `draft_path`.

        `num_speculative_tokens`: what the user asked for, None for the drafter's default. `folder`: a local
        folder whose config.json describes the drafter (its export, or the training checkpoint it is exported
        from), None for a hub id. A request the drafter cannot honour raises ValueError (one line).
        """

    @abstractmethod
    def sglang_args(
        self,
        draft_path: str,
        *,
        num_steps: int | None,
        topk: int | None,
        num_draft_tokens: int | None,
        folder: Path | None = None,
        algorithm: str | None = None,
    ) -> list[str]:
        """SGLang's speculative-decoding flags for the drafter at `draft_path` (None: the drafter's default;
        `folder` as for `vllm_speculative_config`). A request it cannot honour raises ValueError (one line)."""

    def sglang_folder(self, folder: Path, *, exported: bool, options: dict[str, str]) -> SglangFolder:
        """What SGLang needs changed in the local drafter `folder` (default: nothing).

        `exported`: `folder` is this project's export of a training checkpoint, possibly not written yet
        (decide without reading it). `options`: the serve command's folder options (serve_sglang.py). A
        folder SGLang cannot serve raises ValueError (one line).
        """
        return SglangFolder()

    def serve_notes(self, folder: Path) -> list[str]:
        """Warnings about a local export before an engine loads it (e.g. a field the engine would default)."""
        return []

    # --- torch side ---------------------------------------------------------------------------------------

    @abstractmethod
    def build(
        self,
        settings: BaseModel,
        target_config: Any,
        layer_ids: list[int],
        vocab: Any,
        target_embeddings: Any,
        *,
        target_head: Any = None,
        tokenizer: Any = None,
    ) -> Built:
        """The model to train (vocabulary installed, embeddings from the target) and its objective.

        `target_head`: the source's TargetHead (final norm + lm_head) when it has one, for drafters that
        reuse the target's lm_head; `tokenizer`: the target's tokenizer (special tokens), when loaded."""

    @abstractmethod
    def export(self, checkpoint_dir: Path, out_dir: Path, *, dtype: str | None, include_t2d: bool) -> Path:
        """Write the engine folder for a training checkpoint atomically; ExportError names the bad file."""

    @abstractmethod
    def check_export(self, out_dir: Path) -> dict:
        """Strictly check an exported folder (keys, shapes, config); returns its config. Raises ExportError."""

    @abstractmethod
    def load(self, folder: Path, target_embeddings: Any = None) -> Any:
        """The model (eval, fp32) from a training checkpoint or an exported folder."""

    @abstractmethod
    def proposer(self, model: Any, target: Any) -> Any:
        """specdec_bench's proposer for a loaded model (begin/propose/commit, see acceptance/specdec.py)."""
