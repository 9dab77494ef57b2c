"""The rows of the results table, by family. Plain constants: the workflow imports this at parse time."""

from __future__ import annotations

BASELINES = ("real", "real_x2")
RETRIEVAL_MODES = {"retrieval_image": "image", "retrieval_text": "text"}
PROMPT_METHODS = ("prompt_classname", "prompt_templates", "img2img")
TI_METHODS = ("textual_inversion", "textual_inversion_dm")
COND_METHODS = ("cond_vectors", "cond_clusters", "cond_vectors_dm")
PERSONALIZED = TI_METHODS + COND_METHODS
GENERATION_METHODS = PROMPT_METHODS + PERSONALIZED
ALL_METHODS = BASELINES + tuple(RETRIEVAL_MODES) + GENERATION_METHODS
