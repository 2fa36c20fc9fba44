"""Image-text two-tower model (CLIP / SigLIP) with learned temperature/bias."""
import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmcl.models import decoder as decoder_lib
from mmcl.models import text as text_lib
from mmcl.models import transformer
from mmcl.models import vit

# Set by TwoTowers itself, so the tower dicts may not carry them.
_RESERVED = ('num_classes', 'dtype', 'mesh', 'name', 'parent')


def l2_normalize(x_BxD):
  """Unit-norm rows, computed in float32."""
  x_BxD = x_BxD.astype(jnp.float32)
  sq_Bx1 = jnp.sum(jnp.square(x_BxD), axis=-1, keepdims=True)
  return x_BxD * jax.lax.rsqrt(jnp.maximum(sq_Bx1, 1e-12))


def check_temperature(temperature_init: float, max_temperature: float | None):
  if temperature_init <= 0:
    raise ValueError(f'temperature_init must be > 0, got {temperature_init}.')
  if max_temperature is not None and max_temperature <= 0:
    raise ValueError(f'max_temperature must be > 0, got {max_temperature}.')


def logit_scale_and_bias(module: nn.Module, out: dict):
  """Adds `module`'s learned logit scale out['t'] (params 't' = log scale, capped at
  log(max_temperature)) and, with a `bias_init`, bias out['b'] (SigLIP)."""
  t = module.param('t', lambda _: jnp.log(jnp.asarray(module.temperature_init, jnp.float32)))
  if module.max_temperature is not None:
    t = jnp.minimum(t, math.log(module.max_temperature))
  out['t'] = jnp.exp(t).astype(jnp.float32)
  if module.bias_init is not None:
    out['b'] = module.param('b', lambda _: jnp.asarray(module.bias_init, jnp.float32))


class TwoTowers(nn.Module):
  """Embeds images ('img', a ViT) and texts ('txt', a TextTransformer).

  Params: {'img': {..., 'head'}, 'txt': {..., 'head'}, 't': (), ['b': ()]}.
  `t` is log(scale); the scale used is exp(min(t, log(max_temperature))).
  """
  image: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  text: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  embed_dim: int = 512
  temperature_init: float = 10.0  # Initial scale, e.g. 1/0.07 for CLIP.
  max_temperature: float | None = None  # CLIP: 100.0.
  bias_init: float | None = None  # SigLIP: -10.0; None = no `b` param.
  dtype: str = 'float32'  # Compute dtype; params and outputs stay float32.
  remat: bool | str = False  # True / 'full', 'dots', 'dots_no_batch' (transformer.py).
  scan: bool = False  # nn.scan over each dense tower's blocks (transformer.Encoder).
  # A captioning decoder over the image tokens (decoder.TextDecoder fields, e.g. CoCa /
  # CapPa / LocCa; docs/siglip2.md): params under 'dec', its weighted loss in
  # out['aux_loss']. None: no decoder, the same model and parameter tree as without it.
  decoder: Mapping[str, Any] | None = None
  mesh: Any = None  # The device mesh (setup passes it): MoE towers' expert parallelism.

  def __post_init__(self):
    super().__post_init__()
    check_temperature(self.temperature_init, self.max_temperature)
    transformer.canonical_dtype(self.dtype)
    # Build detached towers once so bad variants/fields fail here, not in jit.
    self._tower(vit.ViT, self.image, 'image', parent=None)
    self._tower(text_lib.TextTransformer, self.text, 'text', parent=None)
    if self.decoder is not None:
      self.decoder_module(parent=None)

  def decoder_module(self, **kw) -> decoder_lib.TextDecoder:
    """The decoder (dtype and remat from the model, like the towers); detached with
    parent=None, e.g. to apply it alone to params['dec'] when generating."""
    cfg = self._checked(decoder_lib.TextDecoder, self.decoder, 'decoder',
                        ('dtype', 'name', 'parent'), 'dtype is the model dtype.')
    return decoder_lib.TextDecoder(**cfg, dtype=self.dtype, **kw)

  def _checked(self, cls, cfg, what, reserved, why):
    """`cfg` as a dict for `cls`: no `reserved` or unknown fields, remat from the model
    unless the part turns it on itself."""
    cfg = dict(cfg or {})
    bad = [k for k in cfg if k in reserved]
    if bad:
      raise ValueError(f'TwoTowers.{what} may not set {bad}: {why}')
    fields = {f.name for f in dataclasses.fields(cls)} - set(reserved)
    unknown = sorted(set(cfg) - fields)
    if unknown:
      raise ValueError(f'Unknown field(s) {unknown} in TwoTowers.{what}; '
                       f'valid: {sorted(fields)}')
    if cfg.get('remat') in (None, False, 'none'):
      cfg['remat'] = self.remat
    return cfg

  def _tower(self, cls, cfg, what, **kw):
    # A tower's own `remat` may turn remat on for that tower alone.
    cfg = self._checked(cls, cfg, what, _RESERVED, 'TwoTowers sets them (head size = '
                        'embed_dim, dtype = model dtype).')
    cfg['scan'] = cfg.get('scan') or (self.scan and not cfg.get('moe'))
    cfg['dtype'] = self.dtype
    return cls(**cfg, num_classes=self.embed_dim, mesh=self.mesh, **kw)

  @nn.compact
  def __call__(self, image, text, *, train: bool = False, token_mask=None, mask_token=None,
               dec_tokens=None, dec_loss_mask=None):
    """token_mask [B, N] bool and mask_token [D]: masked image patches (ViT.__call__).
    `dec_tokens` / `dec_loss_mask` (int32 [B, Ld], mmcl/data/decoder_tasks.py): the
    decoder's targets; its loss is computed when they are given (and at init)."""
    out = {}
    zimg_BxD = ztxt_BxD = None
    aux_losses, aux_metrics = [], {}  # From sparse (MoE) towers only.

    def take_aux(tower_out):
      if 'aux_loss' in tower_out:
        aux_losses.append(tower_out.pop('aux_loss'))
        aux_metrics.update(tower_out.pop('metrics'))  # Names carry the modality.

    if image is not None:
      masking = {} if token_mask is None else dict(token_mask_BxN=token_mask,
                                                    mask_token_D=mask_token)
      zimg, img_out = self._tower(vit.ViT, self.image, 'image', name='img')(
          image, train=train, **masking)
      zimg_BxD = l2_normalize(zimg)
      take_aux(img_out)
      out.update({f'img/{k}': v for k, v in img_out.items()})
    if text is not None:
      ztxt, txt_out = self._tower(
          text_lib.TextTransformer, self.text, 'text', name='txt')(
              text, train=train)
      ztxt_BxD = l2_normalize(ztxt)
      take_aux(txt_out)
      out.update({f'txt/{k}': v for k, v in txt_out.items()})
    if self.decoder is not None and image is not None and (
        dec_tokens is not None or self.is_initializing()):
      dec = self.decoder_module(name='dec')
      if dec_tokens is None:  # Init: parameters only.
        dec_tokens = jnp.zeros((image.shape[0], dec.max_len), jnp.int32)
        dec_loss_mask = jnp.ones_like(dec_tokens)
      loss, metrics = dec.loss(out['img/encoded'], dec_tokens, dec_loss_mask, train=train)
      aux_losses.append(dec.loss_weight * loss)
      aux_metrics.update(metrics)
    if aux_losses:
      out['aux_loss'] = sum(aux_losses)
      out['metrics'] = aux_metrics

    logit_scale_and_bias(self, out)
    return zimg_BxD, ztxt_BxD, out
