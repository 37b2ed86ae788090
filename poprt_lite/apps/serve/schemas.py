"""The request bodies each route takes (pydantic), in their ecosystems' spellings: OpenAI's
embeddings, text-embeddings-inference's routes. Responses are written with orjson straight from the
output arrays (no model in between)."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

TokenIds = list[StrictInt]
# a string, a batch of strings, one input's token ids, or a batch of them (OpenAI's and TEI's forms)
Inputs = Union[StrictStr, list[StrictStr], TokenIds, list[TokenIds]]
Direction = Literal["left", "right", "Left", "Right"]


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields of newer API versions


class OpenAIEmbeddingRequest(Body):
    input: Inputs
    model: Optional[str] = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, ge=1)
    user: Optional[str] = None


class EmbedRequest(Body):
    inputs: Inputs
    normalize: bool = True
    truncate: Optional[bool] = None  # None: the server's --auto_truncate
    truncation_direction: Direction = "right"


class EmbedAllRequest(Body):
    inputs: Inputs
    truncate: Optional[bool] = None
    truncation_direction: Direction = "right"


class PredictRequest(Body):
    # a text, a pair [text, text], or a batch of [text] / [text, text]
    inputs: Union[StrictStr, list[StrictStr], list[list[StrictStr]]]
    truncate: Optional[bool] = None
    truncation_direction: Direction = "right"
    raw_scores: bool = False


class RerankRequest(Body):
    query: StrictStr
    texts: list[StrictStr]
    truncate: Optional[bool] = None
    truncation_direction: Direction = "right"
    raw_scores: bool = False
    return_text: bool = False


class TokenizeRequest(Body):
    inputs: Union[StrictStr, list[StrictStr]]
    add_special_tokens: bool = True
