"""The detection study: a Faster R-CNN trained with and without a correlated class.

Hashmi & Li (ICLR 2022 workshop) trained a detector with and without an extra annotated class
that is highly correlated with a target class and compared the loss parts and the AP. For
cells: does annotating a structure that sits next to one class (a platelet clump, a rosette)
change how well the target cells are found, and does the detector lean on it? The parts:

``boxes``
    boxes from instance masks; test images with the structure removed (no torch);
``plan``
    the fields of view, the jobs (condition x seed x fold) and their cache keys (no torch);
``model``
    torchvision Faster R-CNN builders, no download;
``train``
    one job: training with the four loss parts per epoch, AP and recall on held-out patients;
``analysis``
    the tables and the paired tests (:mod:`cellbg.stats`), no torch.

This package's top level imports no torch: ``from cellbg.detect.train import run_detection``
runs the study.
"""

from cellbg.detect.boxes import boxes_from_labels, fill_colour, remove_structure
from cellbg.detect.plan import CONDITIONS, DetectJobSpec, detection_fields, plan_detect_jobs

__all__ = [
    "CONDITIONS",
    "DetectJobSpec",
    "boxes_from_labels",
    "detection_fields",
    "fill_colour",
    "plan_detect_jobs",
    "remove_structure",
]
