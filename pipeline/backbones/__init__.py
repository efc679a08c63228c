"""Backbones: one registry (torchvision names, ``hub:`` entries, fine-tuned model files)
giving a headless model, its embedding width, its preprocessing (from the weights' own
config) and its weights identity; the engines that run it (eager, compiled, ONNX Runtime,
OpenVINO) and what this machine's hardware runs natively.

Never reads images or writes caches; its only file I/O is loading weights and engine exports.
"""
from .engines import ENGINES, Engine, EngineContext, TorchEngine, build_engine, choice_path, engines_dir, model_identity, tune
from .hardware import PRECISIONS, PrecisionChoice, choose_precision
from .preprocessing import ModelTransform, ToPixels
from .registry import (
                       AUX_CLASSIFIERS,
                       MODEL_ARTIFACT_FORMAT,
                       Backbone,
                       HubTrust,
                       Preprocessing,
                       available_models,
                       check_artifact_backbone,
                       check_model_name,
                       code_source,
                       drop_aux_classifiers,
                       file_digest,
                       load_backbone,
                       torch_load_quietly,
)
from .taps import TOKEN_POOLS, layer_table

__all__ = ["AUX_CLASSIFIERS", "TOKEN_POOLS", "ModelTransform", "ToPixels", "layer_table", "ENGINES", "MODEL_ARTIFACT_FORMAT", "PRECISIONS",
           "Backbone", "Engine", "HubTrust", "EngineContext", "PrecisionChoice", "Preprocessing", "TorchEngine", "available_models", "build_engine",
           "check_artifact_backbone", "check_model_name", "choice_path", "choose_precision", "code_source", "drop_aux_classifiers", "engines_dir",
           "file_digest", "load_backbone", "model_identity", "torch_load_quietly", "tune"]
