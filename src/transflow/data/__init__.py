"""Image data: sources (:mod:`.sources`: ``load_data``, ``ImageData``, ``from_datasets``), arrays
read by index (:mod:`.arrays`), image files and folders (:mod:`.imagefiles`), Hugging Face
datasets (:mod:`.huggingface`), the prepared-set format (:mod:`.prepared_set`) and the
``transflow prepare`` job that writes it (:mod:`.prepare`). Imports only ``flows/`` and the
shared root modules."""

from .sources import ImageData, from_datasets, load_data

__all__ = ["ImageData", "from_datasets", "load_data"]
