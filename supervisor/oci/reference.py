"""`oci:` module references, parsed by the distribution reference grammar.

Two spellings, as WAGI accepts them:

    oci:[REGISTRY/]REPOSITORY[:TAG][@sha256:HEX]    the registry is guessed as Docker does
    oci://REGISTRY/REPOSITORY[:TAG][@sha256:HEX]    the first component is always the registry

The grammar is distribution's `reference` package (reference/regexp.go): a first component
holding a `.` or a `:`, or equal to `localhost`, names the registry; otherwise the registry is
docker.io, and a single-name repository there is `library/NAME`. No tag and no digest means
`latest`; with a digest the tag is only a label (the digest is what is pulled).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "DEFAULT_REGISTRY",
    "InvalidReference",
    "Reference",
    "check_registry_host",
    "is_reference",
    "parse_reference",
]

SCHEME = "oci:"
DEFAULT_REGISTRY = "docker.io"
DOCKER_HUB_API_HOST = "registry-1.docker.io"
"""docker.io is a name; its registry API answers at this host (as Docker itself resolves it)."""
DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 255
"""distribution's NameTotalLengthMax: registry and repository together."""

# distribution reference/regexp.go, written out.
_HOST_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(
    rf"(?:{_HOST_COMPONENT}(?:\.{_HOST_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
)
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")


class InvalidReference(ValueError):
    """A reference that does not follow the grammar; the message says which part and why."""


@dataclass(frozen=True, slots=True)
class Reference:
    """A parsed reference: what to ask which registry for."""

    registry: str  # as written (host[:port]); docker.io for Docker Hub
    repository: str
    tag: str | None
    digest: str | None  # "sha256:<hex>"

    @property
    def api_host(self) -> str:
        """The host[:port] whose /v2/ API serves this reference."""
        return DOCKER_HUB_API_HOST if self.registry == DEFAULT_REGISTRY else self.registry

    @property
    def pull_ref(self) -> str:
        """What /v2/<name>/manifests/<ref> is asked for: the digest if any, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return SCHEME + text


def is_reference(module: str) -> bool:
    """True if a modules.toml `module` (or an upload source) is an `oci:` reference."""
    return module.startswith(SCHEME)


def parse_reference(text: str) -> Reference:
    """Parse `oci:...`; raises InvalidReference naming the part that is wrong."""
    if not is_reference(text):
        raise InvalidReference(f"{text!r}: not an oci: reference")
    rest = text[len(SCHEME) :]
    explicit_registry = rest.startswith("//")
    if explicit_registry:
        rest = rest[2:]
    if not rest:
        raise InvalidReference(f"{text!r}: no repository after {SCHEME}")
    name, digest = rest, None
    if "@" in rest:
        name, _, digest = rest.partition("@")
        if not _DIGEST.fullmatch(digest):
            raise InvalidReference(
                f"{text!r}: digest {digest!r} is not sha256: followed by 64 lowercase hex digits"
            )
    tag = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:  # a colon in the last component is a tag; earlier ones belong to a port
        name, _, tag = name.rpartition(":")
        if not _TAG.fullmatch(tag):
            raise InvalidReference(f"{text!r}: tag {tag!r} is not a valid tag")
    registry, repository = _split_registry(name, explicit_registry, text)
    if registry == DEFAULT_REGISTRY and "/" not in repository:
        repository = f"library/{repository}"  # Docker Hub's official images
    for component in repository.split("/"):
        if not _PATH_COMPONENT.fullmatch(component):
            hint = " (repositories are lowercase)" if component.lower() != component else ""
            raise InvalidReference(
                f"{text!r}: repository component {component!r} is not valid{hint}"
            )
    if len(registry) + 1 + len(repository) > MAX_NAME_LENGTH:
        raise InvalidReference(f"{text!r}: name longer than {MAX_NAME_LENGTH} characters")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry, repository, tag, digest)


def check_registry_host(value: str) -> str:
    """`value` if it is a registry's HOST[:PORT] (as --insecure-registry takes it)."""
    if not _DOMAIN.fullmatch(value):
        raise InvalidReference(f"{value!r} is not a registry HOST[:PORT]")
    return value


def _split_registry(name: str, explicit: bool, text: str) -> tuple[str, str]:
    first, slash, remainder = name.partition("/")
    if explicit or (slash and ("." in first or ":" in first or first == "localhost")):
        if not slash or not remainder:
            raise InvalidReference(f"{text!r}: no repository after the registry {first!r}")
        if not _DOMAIN.fullmatch(first):
            raise InvalidReference(f"{text!r}: registry {first!r} is not HOST[:PORT]")
        return first, remainder
    return DEFAULT_REGISTRY, name
