"""Sparse autoencoders: architectures, activation store, trainer, SAELens-format files, metrics, dashboards."""

from workbench.sae.dashboard import FeatureReport, feature_reports, render_dashboard, write_dashboard
from workbench.sae.io import load_sae, save_sae
from workbench.sae.metrics import evaluate_sae
from workbench.sae.model import ARCHITECTURES, SAEConfig, SAEOutput, SparseAutoencoder
from workbench.sae.store import ActivationStore, StoreConfig, activations_at
from workbench.sae.train import TrainConfig, TrainResult, train_sae

__all__ = [
    "ARCHITECTURES", "ActivationStore", "FeatureReport", "SAEConfig", "SAEOutput", "SparseAutoencoder", "StoreConfig",
    "TrainConfig", "TrainResult", "activations_at", "evaluate_sae", "feature_reports", "load_sae",
    "render_dashboard", "save_sae", "train_sae", "write_dashboard",
]
