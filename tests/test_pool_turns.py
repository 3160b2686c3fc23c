"""Large inputs take turns at the document workers (CpuPool.turn); ordinary ones never wait."""

from __future__ import annotations

import asyncio

import pytest

from gateway.documents.mime import _clean_base64, _lenient_b64decode
from gateway.documents.pool import LARGE_INPUT_BYTES, CpuPool, NoTurnError


def test_large_inputs_one_at_a_time_small_ones_pass() -> None:
    async def main() -> None:
        pool = CpuPool(2, 10.0, 0)
        holding = asyncio.Event()
        release = asyncio.Event()

        async def first() -> None:
            async with pool.turn(LARGE_INPUT_BYTES):
                holding.set()
                await release.wait()

        task = asyncio.create_task(first())
        await holding.wait()
        # Ordinary mail goes straight in while a large one converts.
        async with pool.turn(LARGE_INPUT_BYTES - 1, wait_s=0):
            pass
        # A second large one waits its turn, and is told when it did not come in time.
        with pytest.raises(NoTurnError):
            async with pool.turn(50 * LARGE_INPUT_BYTES, wait_s=0.05):
                raise AssertionError("two large inputs at once")
        waiting = asyncio.create_task(_enter(pool, LARGE_INPUT_BYTES))
        await asyncio.sleep(0)
        assert not waiting.done()
        release.set()
        await task
        assert await asyncio.wait_for(waiting, 5) is True

    asyncio.run(main())


async def _enter(pool: CpuPool, size: int) -> bool:
    async with pool.turn(size):
        return True


@pytest.mark.parametrize("text", [
    "QUJD\r\nREVG\r\n",                       # clean, in lines
    "QUJDRA==\r\n",                           # padded at the end
    "QUJD\r\nRA==\r\n\r\n",                   # padding then blank lines
    "QUJD" * 300_000 + "\r\nRA==",            # longer than one slice
    "QUJD" * ((1 << 20) // 4 - 1) + "QQ==" + "\r\n\r\n",  # padding ends the first slice
])
def test_clean_base64_matches_the_lenient_decoder(text: str) -> None:
    assert _clean_base64(text) == _lenient_b64decode(text.encode())[0]


@pytest.mark.parametrize("text", [
    "QUJD*REVG",          # a stray character
    "QUI=QUJD",           # padding in the middle (glued chunks)
    "QUJD" * ((1 << 20) // 4 - 1) + "QQ==" + "QUJD",  # ... at the end of a slice
    "QUJDR",              # cut mid-quantum
    "QUJD\u00e9REVG",     # not ASCII
])
def test_unclean_base64_is_left_to_the_lenient_decoder(text: str) -> None:
    assert _clean_base64(text) is None
