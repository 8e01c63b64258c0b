"""``kzoo train <task>`` finds each family's task in the registry."""
import pytest

from kzoo.cli import build_parser, main
from kzoo.train import Task
from kzoo.train.tasks import TASKS, task_module


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_registered_task_is_a_train_subcommand(name):
    module = task_module(name)
    assert issubclass(module.TASK, Task) and module.HELP
    args = build_parser().parse_args(["train", name])
    assert args.task == name and args.leaf_parser.prog.endswith(f"train {name}")


def test_an_unknown_task_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "nope"])
    assert exit_.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown task 'nope' [(]known: classify"):
        task_module("nope")
