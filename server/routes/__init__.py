"""HTTP routes, one module per resource."""

from server.routes import health, predict, tasks

routers = (predict.router, tasks.router, health.router)
