"""A small client for the public API: stream tokens from Generate, list nodes, show the topology."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc

from services.common.pb import common_pb2, router_pb2, router_pb2_grpc
from services.common.server import CHANNEL_OPTIONS


class SynapseClient:
    """One long-lived channel to the router. Use as a context manager, or call close()."""

    def __init__(
        self, address: str = "127.0.0.1:50050", *, token: str | None = None, tls_ca: Path | str | None = None
    ) -> None:
        """`token`: the router's API token, sent as a bearer token. `tls_ca`: a certificate to trust for a
        router serving TLS (a self-signed one); None = plaintext."""
        if tls_ca is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
            self.channel = grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
        else:
            self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = router_pb2_grpc.RouterServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        timeout_s: float | None = 300.0,
    ) -> Iterator[router_pb2.GenerateResponse]:
        """Stream one response per token; the last carries finish_reason and usage."""
        sampling = common_pb2.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
        if seed is not None:
            sampling.seed = seed
        request = router_pb2.GenerateRequest(
            max_tokens=max_tokens, stop=list(stop), ignore_eos=ignore_eos, sampling=sampling
        )
        if isinstance(prompt, str):
            request.prompt = prompt
        else:
            request.prompt_token_ids.ids.extend(prompt)
        yield from self.stub.Generate(request, timeout=timeout_s, metadata=self.metadata)

    def complete(self, prompt: str | Sequence[int], **options: object) -> str:
        """The whole generated text at once."""
        return "".join(response.text for response in self.generate(prompt, **options))

    def nodes(self) -> list[router_pb2.NodeStatus]:
        return list(self.stub.ListNodes(router_pb2.ListNodesRequest(), timeout=10, metadata=self.metadata).nodes)

    def topology(self) -> router_pb2.TopologyResponse:
        return self.stub.Topology(router_pb2.TopologyRequest(), timeout=10, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> SynapseClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
