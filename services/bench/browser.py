"""A browser node for the bench: the gateway's web node page in headless Chromium (WebGPU on the CPU through
SwiftShader), driven by Playwright, joined to a running stack."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from services.common.errors import Unavailable
from services.launcher import Stack

CHROMIUM = "/usr/bin/chromium"  # Debian's; Playwright's own browsers are never installed
# --enable-unsafe-webgpu gives headless Chromium a SwiftShader adapter; the rest pin that choice and keep the
# browser quiet and unthrottled (the page tests use the same flags: tests/webnode/conftest.py).
CHROMIUM_ARGS = [
    "--enable-unsafe-webgpu",
    "--enable-features=Vulkan",
    "--use-vulkan=swiftshader",
    "--use-webgpu-adapter=swiftshader",
    "--disable-vulkan-surface",
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
]
PAGE_SPEED = 3.0  # layer passes/s reported at hello instead of running the page's start-up benchmark


@contextlib.contextmanager
def browser_node(stack: Stack, node_id: str = "web-0", timeout_s: float = 600.0) -> Iterator[list[str]]:
    """A page joined to the stack's first gateway, served from http://localhost (a secure context, so WebGPU is
    offered); yields the page's console lines. Fails with the page's last lines when it reports an error."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    query = f"node_id={node_id}&speed={PAGE_SPEED}" + (f"&join_token={stack.join_token}" if stack.join_token else "")
    url = f"http://localhost:{stack.gateway_ports[0][1]}/?{query}"
    console: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
            page.on("pageerror", lambda error: console.append(f"pageerror: {error}"))
            page.goto(url)
            try:
                page.wait_for_function(
                    "window.synapse && (window.synapse.state === 'joined' || window.synapse.state === 'loading'"
                    " || window.synapse.state === 'ready' || window.synapse.error)",
                    timeout=timeout_s * 1000,
                )
            except PlaywrightError as error:
                raise Unavailable(f"the page never joined: {error}\n" + "\n".join(console[-20:])) from None
            error = page.evaluate("window.synapse.error")
            if error:
                raise Unavailable(f"the page failed: {error}\n" + "\n".join(console[-20:]))
            yield console
        finally:
            browser.close()
