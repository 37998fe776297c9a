"""IIoT failure prediction (`/iiot`)."""
