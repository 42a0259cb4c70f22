"""Images of the local lmms-eval test tasks, drawn from each record (no image files, no downloads)."""
import numpy as np
from PIL import Image


def doc_to_visual(doc):
    """A width x height picture of random pixels from the record's seed (not square: padding is exercised)."""
    width, height = doc["size"]
    pixels = np.random.RandomState(doc["seed"]).randint(0, 256, (height, width, 3), np.uint8)
    return [Image.fromarray(pixels)]


def doc_to_text(doc):
    return doc["question"]


def doc_to_choice(doc):
    return doc["choices"]


def doc_to_target(doc):
    return doc["answer"]
