# SPDX-License-Identifier: Apache-2.0
"""The ``config.json`` round trip shared by every model config dataclass of the trainer."""
import dataclasses
from typing import Mapping


class ConfigDict:
    """Mixin for a model config dataclass with a class attribute ``architecture``.

    ``to_dict`` gives the JSON form (every field plus ``architecture``); ``from_dict`` builds the
    config from such a dict, ignoring keys that are not fields (``architecture``,
    ``format_version``, ...).
    """

    def to_dict(self) -> dict:
        """The JSON form: every field plus ``architecture``."""
        return {"architecture": self.architecture, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, config: Mapping):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})
