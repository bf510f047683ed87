"""HTTP routes, one module per resource."""

from piggyback_serve.server.routes import health, predict, tasks

routers = (predict.router, tasks.router, health.router)
