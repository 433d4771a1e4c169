from tests.sim_fixtures import sim_fleet

__all__ = ["sim_fleet"]
