"""Take the README's screenshot of the browser client: two people chatting.

    python tools/screenshot.py [docs/screenshot.png]

Needs Debian's chromium (/usr/bin/chromium) and the playwright package.
"""

import sys

from playwright.sync_api import sync_playwright

from wschat.cli import STATIC_DIR
from wschat.chat import Chat
from wschat.server import Server


def main(path: str = "docs/screenshot.png") -> None:
    server = Server("127.0.0.1", 0, static_dir=STATIC_DIR, ping_interval=0)
    Chat(server)
    server.start()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
            pages = {}
            for nick in ("ada", "grace"):
                page = browser.new_page(viewport={"width": 900, "height": 520})
                page.goto(f"http://127.0.0.1:{server.port}/?nick={nick}")
                page.click("button[type=submit]")
                page.wait_for_selector("#status.online")
                pages[nick] = page
            lines = [("ada", "Hello! Is the build green?"), ("grace", "All green. Deploying now."),
                     ("ada", "<b>Great</b> - markup shows as text, as it should.")]
            for nick, text in lines:
                pages[nick].fill("#message", text)
                pages[nick].press("#message", "Enter")
            pages["ada"].locator("#messages li.message").nth(len(lines) - 1).wait_for()
            pages["ada"].screenshot(path=path)
            browser.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main(*sys.argv[1:])
