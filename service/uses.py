"""What every use of a served model (Encode, Decode, Reconstruct, SamplePrior, Score) goes
through, whatever the protocol that called it: the in-flight gauge that autoscalers read
(``vaeserve_in_flight_calls{model}``: calls inside the data plane, queued or running), the use's
span when traces are on (service.tracing), and the response cache (service.cache) for calls
whose answer is a function of their bytes, and, for a call routed by a traffic split with a
shadow, its mirrored copy (service.shadow).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from collections.abc import Callable

from vaeserve.service import tracing
from vaeserve.service.cache import ResponseCache, digest_into
from vaeserve.service.shadow import SHADOW


def use(deterministic: Callable[..., bool]):
    """A data-plane use, counted in flight and cached when ``deterministic(**arguments)`` says its
    answer is a function of its arguments, and mirrored to the call's shadow if it has one. The
    served model carries ``in_flight`` (a gauge's child, or None), ``cache`` (None: off),
    ``cache_key`` and ``mirror`` (service.shadow.Mirror), set by the manager."""

    def wrap(method):
        signature = inspect.signature(method)
        name = method.__name__

        async def answer(self, span, args, kwargs):
            cache: ResponseCache = self.cache
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            arguments = dict(list(bound.arguments.items())[1:])
            if not deterministic(**arguments):
                return await method(self, *args, **kwargs)
            # SHA-256: OpenSSL's runs on the CPU's SHA extensions where it has them, about twice
            # BLAKE2b's speed on this machine; every miss pays it over the whole request
            hasher = hashlib.sha256(self.cache_key)
            hasher.update(name.encode())
            for value in arguments.values():
                digest_into(hasher, value)
            key = hasher.digest()
            model = self.version.name
            found = cache.get(key, model, name)
            tracing.annotate(span, cache="hit" if found is not None else "miss")
            if found is not None:
                return dict(found)
            return dict(cache.put(key, await method(self, *args, **kwargs), model))

        @functools.wraps(method)
        async def run(self, *args, **kwargs):
            gauge = self.in_flight
            if gauge is not None:
                gauge.inc()
            try:
                first = args[0] if args else next(iter(kwargs.values()))  # the rows, or a count
                with tracing.use(name, self.version, first) as span:
                    if self.cache is None:  # the common case: no second coroutine per call
                        answered = await method(self, *args, **kwargs)
                    else:
                        answered = await answer(self, span, args, kwargs)
            finally:
                if gauge is not None:
                    gauge.dec()
            shadow = SHADOW.get()
            if shadow is not None and self.mirror is not None:
                self.mirror.send(shadow, name, args, kwargs, answered)
            return answered

        return run

    return wrap


# Which calls are a function of their bytes (the data plane's argument names).
def drawn_with_seed_or_not_at_all(sample: bool, seed: int | None, **_) -> bool:
    return not sample or seed is not None


def seeded(seed: int | None, **_) -> bool:
    return seed is not None
