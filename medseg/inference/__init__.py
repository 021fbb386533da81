"""Inference: sliding-window prediction written back in the scan's own geometry."""
