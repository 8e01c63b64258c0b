"""``kzoo train hmar-mask``: HMAR's masked-prediction stage (see ``kzoo.train.tasks.hmar``)."""
from kzoo.train.tasks.hmar import HMARMaskTask
from kzoo.train.tasks.hmar import add_mask_arguments as add_arguments

HELP = "HMAR's masked-prediction stage: a mask branch trained on a frozen stage-1 model (--init)"
TASK = HMARMaskTask

__all__ = ["HELP", "TASK", "add_arguments"]
