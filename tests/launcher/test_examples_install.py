"""The examples and docs agree with what the nodes will run (docs/install.md).

- Every container image is vLLM's, at the release the project installs for GPU machines without an image
  (modelopt_ext.deploy.vllm_env): one vLLM version everywhere.
- Every environment variable an example sets is read by something the job runs (no dead knobs).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from modelopt_ext.deploy import vllm_env

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").rglob("*.yaml"))
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Where a job reads its environment: node scripts, the launcher, the Python that runs on nodes.
READERS = [*(REPO / "common").rglob("*.sh"), *(REPO / "launcher").rglob("*"), *(REPO / "modelopt_ext").rglob("*.py")]


def _gpu_vllm_version() -> str:
    (req,) = [r for r in vllm_env.GPU_SPEC if r.startswith("vllm==")]
    return req.split("==", 1)[1]


def _tasks(spec: dict) -> list[dict]:
    pipe = spec["pipeline"]
    return [v for k, v in pipe.items() if re.fullmatch(r"task_\d+", k)] + list(pipe.get("tasks") or [])


def test_every_container_is_vllms_image_at_the_projects_vllm_release():
    expected = f"vllm/vllm-openai:v{_gpu_vllm_version()}"
    seen = 0
    for path in EXAMPLES:
        for task in _tasks(yaml.safe_load(path.read_text())):
            image = (task.get("slurm_config") or {}).get("container")
            if image is not None:
                seen += 1
                assert image == expected, f"{path.relative_to(REPO)}: container {image}, expected {expected}"
    assert seen >= 5


def test_docs_name_the_same_image():
    expected = f"vllm/vllm-openai:v{_gpu_vllm_version()}"
    for doc in DOCS:
        for tag in re.findall(r"vllm/vllm-openai:v[0-9][0-9.]*[0-9]", doc.read_text()):
            assert tag == expected, f"{doc.relative_to(REPO)} names {tag}, the examples use {expected}"


def test_every_example_environment_variable_is_read_by_the_job():
    sources = "\n".join(p.read_text(errors="replace") for p in READERS if p.is_file())
    for path in EXAMPLES:
        for task in _tasks(yaml.safe_load(path.read_text())):
            env = task.get("environment") or []
            items = env.items() if isinstance(env, dict) else [kv for d in env for kv in d.items()]
            for name, _ in items:
                assert re.search(rf"\b{re.escape(name)}\b", sources), (
                    f"{path.relative_to(REPO)}: environment {name} is read by nothing in common/, launcher/ "
                    f"or modelopt_ext/"
                )
