"""The control plane's HTTP surface (Starlette, served by uvicorn inside ControlPlane): the
OAuth endpoints today; operational routes can join the same app (``build_app``)."""
