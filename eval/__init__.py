"""Evaluation of pathfm backbones: embeddings, kNN and linear probes, label-free metrics, reports."""
