"""``save_pretrained`` of a quantized model writes its ``quantization_config.save_format`` (hfquant, GPTQ,
compressed-tensors or GGUF): the model's class is swapped for a subclass that does."""

from __future__ import annotations

import copyreg

from hfquant.formats.export import save_pretrained_as


class _SaveFormat:
    """Mixed into the class of every model the quantizer produced (see ``_install_save_format_hook``):
    ``save_pretrained`` writes ``quantization_config.save_format``, whether it is called as
    ``model.save_pretrained(d)`` or ``type(model).save_pretrained(model, d)``."""

    _hfquant_base: type  # the model's original class, set on each subclass

    def save_pretrained(self, save_directory, **kwargs):
        """``save_pretrained`` of the model's class for ``save_format: hfquant`` (the default); for ``"gptq"``,
        ``"compressed-tensors"``, ``"gguf"`` and ``"onnx"`` the hfquant layout is written to a temporary folder and
        converted (``hfquant.formats.export.save_pretrained_as``)."""
        fmt = getattr(getattr(self.config, "quantization_config", None), "save_format", "hfquant")
        if fmt == "hfquant":
            return super().save_pretrained(save_directory, **kwargs)
        tokenizer_dir = getattr(self, "name_or_path", None) if fmt in ("gguf", "onnx") else None
        return save_pretrained_as(super().save_pretrained, save_directory, fmt, tokenizer_dir=tokenizer_dir, **kwargs)

    def __reduce_ex__(self, protocol):
        # pickle finds classes by module and name, which lead to the original class: rebuild the subclass from it
        rv = super().__reduce_ex__(protocol)
        if isinstance(rv, tuple) and rv[0] is copyreg.__newobj__ and rv[1][0] is type(self):
            return (_new_with_save_format, (self._hfquant_base, *rv[1][1:]), *rv[2:])
        return rv


_SAVE_FORMAT_CLASSES: dict[type, type] = {}


def _save_format_class(base: type) -> type:
    """``base`` with ``_SaveFormat`` mixed in, made once per class. It has ``base``'s ``__name__``,
    ``__qualname__`` and ``__module__``, so ``config.json``'s ``architectures`` (the class name) and everything
    transformers derives from the class (remote code, ``can_generate``) stay as they are."""
    cls = _SAVE_FORMAT_CLASSES.get(base)
    if cls is None:
        cls = type(base.__name__, (_SaveFormat, base), {
            "__module__": base.__module__, "__qualname__": base.__qualname__, "__doc__": base.__doc__,
            "_hfquant_base": base})
        _SAVE_FORMAT_CLASSES[base] = cls
    return cls


def _new_with_save_format(base: type, *args):
    """An empty instance of ``base``'s save-format subclass (pickle and ``copy.deepcopy`` fill in its state)."""
    cls = _save_format_class(base)
    return cls.__new__(cls, *args)


def install_save_format_hook(model) -> None:
    """Make ``save_pretrained`` honour ``quantization_config.save_format``. The model's class is swapped for a
    subclass (``_save_format_class``) rather than patching the instance, so that a call through the class,
    ``type(model).save_pretrained(model, d)``, honours it too; ``copy.deepcopy(model)`` keeps the class.
    transformers' ``save_pretrained`` offers no hook for this: a quantizer can only change the state dict
    (``get_state_dict_and_metadata``), while the GPTQ and compressed-tensors layouts also change
    ``config.json`` and add files."""
    if getattr(type(model), "_hfquant_base", None) is None:  # not yet (also across a reload of this module)
        model.__class__ = _save_format_class(type(model))
