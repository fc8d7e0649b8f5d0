from twisted.application.service import ServiceMaker

smartserve = ServiceMaker(
    "smartserve",
    "smartserve.service",
    "A drainable smart server for Breezy branches over bzr+ssh:// and bzr://.",
    "smartserve",
)
