//! onevision operator: CRD types, the pure planner, controllers.
