"""Fine-tune LLMs with LoRA for intent classification; predict with `IntentClassifier`.

The API names load lazily, so `import intentlora` (and the CLI's --help) stays
fast: torch and transformers load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from intentlora.predict import IntentClassifier, Prediction, UnknownModelError

__all__ = ["IntentClassifier", "Prediction", "UnknownModelError"]


def __getattr__(name: str):
    if name in __all__:
        from intentlora import predict

        return getattr(predict, name)
    raise AttributeError(f"module 'intentlora' has no attribute {name!r}")
