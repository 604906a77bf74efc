"""The demo: SPA end to end on tasks with a known truth, with everything it builds on this machine.

Not the engine: no engine module imports it (`selfee_fast.tasks` only keeps older task specs working). `run` is `selfee-fast demo`; `tasks`
holds the Task interface and the bundled tasks; `tiny` builds a small Llama and a tokenizer;
`sft` makes pi_init from a task's demonstrations.
"""

from .run import DEFAULT, QUICK, DemoScale, run_demo

__all__ = ["DEFAULT", "QUICK", "DemoScale", "run_demo"]
