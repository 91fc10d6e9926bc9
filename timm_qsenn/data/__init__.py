"""Datasets and their files; here: CUB-200-2011's attribute labels."""

from .attributes import AttributeLabels, read_cub_attributes, read_cub_class_attributes

__all__ = ["AttributeLabels", "read_cub_attributes", "read_cub_class_attributes"]
