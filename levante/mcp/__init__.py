"""MCP client layer: the operator's MCP servers, read from a config file in the common
`mcpServers` format and kept connected for the life of the HTTP server, so their tools can be
offered to the model and run on its behalf."""

from levante.mcp.config import HttpServer, StdioServer, load_config
from levante.mcp.servers import CallResult, MCPServers, Tool, ToolCallFailed

__all__ = ["CallResult", "HttpServer", "MCPServers", "StdioServer", "Tool", "ToolCallFailed", "load_config"]
