"""cxr-worker: triage chest radiographs for pneumonia next to a PACS.

The package layout follows the pipeline (see README "Layout"):

    receive -> [worklist/queue] -> gate -> decode -> score -> report -> send

``pipeline`` composes the stages; ``service`` and ``cli`` are the composition root.
"""

__version__ = "0.1.0"
