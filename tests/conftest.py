"""Shared test set-up: small thread pools keep the 2-core CI machine from oversubscribing."""

import torch

torch.set_num_threads(1)
